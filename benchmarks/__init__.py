"""Benchmarks: stream simulator, online evaluation, the Hydra app and performance scripts."""
