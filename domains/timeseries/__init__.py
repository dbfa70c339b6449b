"""timeseries domain (work in progress)."""
