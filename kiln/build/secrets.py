"""Secret values in cache keys: an HMAC with a key kept on this host, so a changed secret changes the key
while the key reveals nothing (a plain hash of a short password could be brute-forced)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from kiln.host.state import secret_file, state_dir


def _key_file() -> Path:

    return state_dir() / "secret-key"


def host_key() -> bytes:
    return secret_file(_key_file(), lambda: secrets.token_bytes(32))


def secret_digest(value: str) -> str:
    return hmac.new(host_key(), value.encode(), hashlib.sha256).hexdigest()
