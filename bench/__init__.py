"""Benchmarks: each prints a table, writes JSON (and a PNG) under bench/results/, and
compares against its baseline measured in the same run (ratios, not absolute seconds)."""

from moe_diffuseq.allocator import tune_cpu_allocator

# Every benchmark process (memory children too) runs with the allocator the `moe-diffuseq`
# command uses, so that both models of a comparison are timed and measured alike.
MALLOC_TUNED = tune_cpu_allocator()
