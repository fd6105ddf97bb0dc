"""kiln's state directory: what outlives builds and caches on this host (the local Prefect server's data,
the secret-key for cache-key HMACs, the accelerator probe, the records of what was published)."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """`$KILN_STATE`, else `/var/lib/kiln` as root, else `~/.local/state/kiln`.

    For a non-root user `$XDG_STATE_HOME/kiln` is used when `XDG_STATE_HOME` is set.
    """
    env = os.environ.get("KILN_STATE")
    if env:
        return Path(env).expanduser().absolute()
    if os.geteuid() == 0:
        return Path("/var/lib/kiln")
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state"
    return base.absolute() / "kiln"
