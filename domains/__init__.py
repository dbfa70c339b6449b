"""Domains built on the Polyformer core: vision, speech, time series, RL (import polyformer.domains.<name>)."""
