"""The merchant service; see README.md beside this file."""
