"""Benchmarks: `python -m bench [--quick] [name ...]` writes bench/results/<name>.json and .md."""
