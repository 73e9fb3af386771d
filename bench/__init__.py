"""Benchmarks: they print numbers and ratios and never fail a build on speed."""
