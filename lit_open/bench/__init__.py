"""Benchmarks of lit-open's building blocks, run as `python -m lit_open.bench <name>`."""
