"""Prefect tasks, one module per pipeline stage: thin wrappers that add retries, cache keys, logging and
artifacts around the mechanisms in `kiln`."""
