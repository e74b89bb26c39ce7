"""Benchmarks of the relay and producers, run from a checkout, not installed.

See docs/performance.md for the commands and what each figure means.
"""
