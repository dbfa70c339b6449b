"""rl domain (work in progress)."""
