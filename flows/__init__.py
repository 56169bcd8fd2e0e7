"""Prefect flows: thin wrappers over :mod:`sbipipe` (between tasks travel file paths and content hashes).

One module per flow: ``simulate``, ``train``, ``validate``, ``pipeline``, ``infer``, ``inbox``,
``source_posterior``, ``compare``; ``serve`` serves them as deployments (``sbipipe serve``)."""

__all__ = ["compare", "inbox", "infer", "pipeline", "serve", "simulate", "source_posterior", "train", "validate"]
