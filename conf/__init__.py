"""Hydra configs of the benchmark app (``python -m benchmarks.run``), read as ``pkg://conf``.

A package so the YAML files ship with the installed project (``package_data``) and Hydra
finds them the same way from a checkout and from an installation.
"""
