"""Secret values in cache keys: an HMAC with a key kept on this host, so a changed secret changes the key
while the key reveals nothing (a plain hash of a short password could be brute-forced)."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

from kiln.host.state import secret_file, state_dir


def _key_file() -> Path:

    return state_dir() / "secret-key"


def host_key() -> bytes:
    return secret_file(_key_file(), lambda: secrets.token_bytes(32))


def secret_digest(value: str) -> str:
    return hmac.new(host_key(), value.encode(), hashlib.sha256).hexdigest()


# DIB_* variables whose names say they hold a secret (DIB_DEV_USER_PASSWORD, DIB_RHSM_PASSWORD, a token, a
# private key): treated as the spec's `secrets` are
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|PASSPHRASE|SECRET|TOKEN|CREDENTIAL|PRIVATE_KEY|API_KEY")


def dib_secrets(host_env: Mapping[str, str]) -> dict[str, str]:
    """The DIB_* variables of `host_env` that hold secrets, by their names."""
    return {k: v for k, v in host_env.items() if k.startswith("DIB_") and SECRET_NAME.search(k.upper()) and v}
