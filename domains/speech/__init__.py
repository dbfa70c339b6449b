"""speech domain (work in progress)."""
