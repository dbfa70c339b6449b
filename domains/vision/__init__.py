"""vision domain (work in progress)."""
