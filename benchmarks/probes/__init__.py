"""One-off measurements behind figures cited in the docs; each runs as `python -m benchmarks.probes.NAME`."""
