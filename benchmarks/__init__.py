"""Benchmark suite: ``python -m benchmarks.run --help``."""
