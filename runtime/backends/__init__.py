"""Backends: small adapters that turn an artifact into a `denoise(x, t)` callable."""
