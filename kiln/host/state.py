"""kiln's state directory: what outlives builds and caches on this host (the local Prefect server's data,
the secret-key for cache-key HMACs, the accelerator probe, the records of what was published)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
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


def secret_file(path: Path, make: Callable[[], bytes], *, _patience: float = 2.0) -> bytes:
    """The content of the secret file `path` (mode 0600 in a 0700 directory), made by `make` on first use. Two
    first uses at once agree: the file is created exclusively, and the loser reads the winner's."""
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        deadline = time.monotonic() + _patience
        while not (data := _read_private(path)) and time.monotonic() < deadline:
            time.sleep(0.05)  # its maker is writing it
        if data:
            return data
        # still empty: its maker was killed between creating and writing it; make it anew
        path.unlink(missing_ok=True)
        return secret_file(path, make, _patience=_patience)
    value = make()
    try:
        os.write(fd, value)
    finally:
        os.close(fd)
    return value


def _read_private(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
        return data
    finally:
        os.close(fd)
