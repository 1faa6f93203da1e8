"""Benchmarks with lm-eval on the in-memory model: the adapter shared by `lit-open eval` and the lm_eval plugin."""
