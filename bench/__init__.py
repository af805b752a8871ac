"""Measuring instruments: load drivers, profiler, cost models, comparisons."""
