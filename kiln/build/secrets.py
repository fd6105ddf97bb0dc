"""Secret values in cache keys: an HMAC with a key kept on this host, so a changed secret changes the key
while the key reveals nothing (a plain hash of a short password could be brute-forced)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from pathlib import Path

from kiln.host.run import SECRET_NAME
from kiln.host.state import secret_file, state_dir


def _key_file() -> Path:

    return state_dir() / "secret-key"


def host_key() -> bytes:
    return secret_file(_key_file(), lambda: secrets.token_bytes(32))


def secret_digest(value: str) -> str:
    return hmac.new(host_key(), value.encode(), hashlib.sha256).hexdigest()


def dib_secrets(host_env: Mapping[str, str]) -> dict[str, str]:
    """The DIB_* variables of `host_env` whose names say they hold a secret (DIB_DEV_USER_PASSWORD, a token, a
    private key; kiln.host.run's SECRET_NAME, the names children never inherit): treated as the spec's
    `secrets` are."""
    return {k: v for k, v in host_env.items() if k.startswith("DIB_") and SECRET_NAME.search(k.upper()) and v}
