"""Benchmarks: every backend against the alternatives a user would pick, in one run."""
