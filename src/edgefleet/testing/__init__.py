"""Helpers that run real services (brokers, ...) for tests and benchmarks."""
