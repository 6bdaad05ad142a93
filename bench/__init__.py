"""Benchmarks and the mock OpenAI-compatible backend."""
