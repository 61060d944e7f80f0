"""Benchmarks: what the orchestration costs, side by side with the bare alternatives.

`make bench` (``python -m benchmarks.run``) runs them all and writes ``benchmarks/results/``.
Every figure that matters is a ratio of two paths measured in the same run, interleaved, on the
same model, data and batch: this machine is shared, so absolute seconds drift and ratios hold.
"""
