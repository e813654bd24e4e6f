"""Benchmarks (not tests): one command each, results written to bench/results.json."""
