"""Benchmarks (run as scripts, e.g. ``python bench/throughput.py``; importable for tests)."""
