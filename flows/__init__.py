"""Prefect flows: thin wrappers over :mod:`sbipipe` (filled in by the service issue)."""
