"""Secret values in cache keys: an HMAC with a key kept on this host, so a changed secret changes the key
while the key reveals nothing (a plain hash of a short password could be brute-forced)."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from kiln.host.state import private_dir, state_dir


def _key_file() -> Path:

    return state_dir() / "secret-key"


def host_key() -> bytes:
    path = _key_file()
    try:
        return path.read_bytes()
    except FileNotFoundError:
        private_dir(path.parent)
        key = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, key)
        finally:
            os.close(fd)
        return key
    except FileExistsError:  # pragma: no cover - a concurrent first use
        return path.read_bytes()


def secret_digest(value: str) -> str:
    return hmac.new(host_key(), value.encode(), hashlib.sha256).hexdigest()
