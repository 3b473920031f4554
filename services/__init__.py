"""CityTap's five services; each subpackage runs as its own process (`python -m services.X`)."""
