"""kiln's state directory: what outlives builds and caches on this host (the local Prefect server's data,
the secret-key for cache-key HMACs, the accelerator probe, the records of what was published)."""

from __future__ import annotations

import os
from pathlib import Path


def private_dir(path: Path) -> Path:
    """`path` as a directory only its owner may enter (0700), made if missing and tightened if not: what kiln
    keeps there (the Prefect server's database and auth, the HMAC key, images with a stranger's setuid
    binaries and device nodes) is no business of the host's other users."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


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
