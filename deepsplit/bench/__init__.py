"""Benchmarks behind `deepsplit bench`."""
