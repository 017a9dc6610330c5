"""Benchmarks for cxr-ddpm: `python -m bench all --out bench/results` (see bench/__main__.py)."""
