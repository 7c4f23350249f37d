"""Benchmarks of titok-jax against the official code, run from the repository root as
``python -m benchmarks.<name>``; shared helpers are in :mod:`benchmarks.common`. Not part of the
installed package."""
