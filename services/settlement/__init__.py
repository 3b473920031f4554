"""The settlement service; see README.md beside this file."""
