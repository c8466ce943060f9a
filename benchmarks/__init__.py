"""Benchmarks: model size and training-step throughput (run with `python -m benchmarks.<name>`)."""
