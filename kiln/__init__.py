"""kiln: an image factory for OpenStack clouds.

The modules in this package are the mechanisms (plain Python, no Prefect); `tasks/` and `flows/`
wrap them into the Prefect pipeline.
"""

__version__ = "0.1.0"

import logging as _logging

# kiln's mechanisms log at INFO; Prefect forwards the `kiln` logger into run logs (PREFECT_LOGGING_EXTRA_LOGGERS)
# but leaves its level alone, so without this a flow run started by a worker would drop them.
_logging.getLogger("kiln").setLevel(_logging.INFO)
