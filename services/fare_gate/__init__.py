"""The fare_gate service; see README.md beside this file."""
