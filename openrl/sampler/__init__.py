"""Sampling workers: generation backends and adapter caching. Not built yet."""
