"""Benchmarks that run inside the package: the baselines and the search-quality bench.

Nothing in megapuzzle imports this package (tests/test_layering.py)."""
