"""Benchmarks: figures and ratios against peers (see README, Performance)."""
