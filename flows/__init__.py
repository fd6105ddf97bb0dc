"""Prefect flows: the pipeline, read top to bottom."""
