"""The wallet service; see README.md beside this file."""
