"""Source models: small built-in networks and their training/caching."""

from benchmarks.models.digits import DigitsCNN, digits_source_model, train_digits_model

__all__ = ["DigitsCNN", "digits_source_model", "train_digits_model"]
