"""Benchmarks: each prints a table, writes JSON (and a PNG) under bench/results/, and
compares against its baseline measured in the same run (ratios, not absolute seconds)."""
