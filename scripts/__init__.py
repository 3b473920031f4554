"""Project scripts runnable as modules (`python -m scripts.demo`)."""
