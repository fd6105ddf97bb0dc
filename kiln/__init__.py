"""kiln: an image factory for OpenStack clouds.

The modules in this package are the mechanisms (plain Python, no Prefect); `tasks/` and `flows/`
wrap them into the Prefect pipeline.
"""

__version__ = "0.1.0"
