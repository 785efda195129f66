"""Benchmarks: each prints a table and writes JSON under bench/out/. See bench/RESULTS.md."""
