"""Benchmarks: fastsde samplers against the peers on the same score and the same noise."""
