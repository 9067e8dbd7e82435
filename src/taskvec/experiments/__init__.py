"""Protocols of the paper: evaluation, layer choice, baselines."""
