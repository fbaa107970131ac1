"""Helpers that run and load the notebooks from outside Jupyter."""
