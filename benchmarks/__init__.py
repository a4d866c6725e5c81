"""Benchmarks: figures and ratios against peers (see README, Performance).

Run from the repository root (``python -m benchmarks``): the Redis Cluster they build comes
from the tests' helpers (``tests/servers.py``)."""
