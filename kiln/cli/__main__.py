"""`python -m kiln.cli`: the same as the `kiln` command."""

import os

from kiln.cli.main import main

os.environ.setdefault("PYTHONUNBUFFERED", "1")

raise SystemExit(main())
