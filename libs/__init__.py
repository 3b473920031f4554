"""Shared libraries for CityTap services.

Only code that two or more services need lives here. Nothing in this package creates a
client at import time: every connection is made by a factory that a service's composition
root calls with its settings.
"""
