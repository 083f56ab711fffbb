"""Benchmarks: throughput (`sift bench`, benchmarks/throughput.py); see benchmarks/README.md."""
