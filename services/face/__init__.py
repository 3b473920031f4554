"""The face service; see README.md beside this file."""
