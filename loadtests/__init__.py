"""Load tests and benchmarks that run against a running stack and print their figures.

Each module is a command (`python -m loadtests.<name>`) behind a `make` target; none of them
is part of `make test`. See loadtests/README.md.
"""
