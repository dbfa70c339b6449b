"""Offline RL: a Decision Transformer on the core's causal encoder (KV-cached acting), with a BC baseline."""
