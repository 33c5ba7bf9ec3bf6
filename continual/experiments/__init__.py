"""Experiments that compare normalizations in online continual learning."""
