"""Credentials in URLs (`https://user:token@mirror/…`): what may be shown or recorded of a URL, and the
secrets it carries. A mirror's or base's credentials are used to fetch, and never reach a log, a manifest,
S3, or the image's own apt sources."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit


def credentials_of(url: str) -> list[str]:
    """The secrets a URL carries in its userinfo: the password and `user:password` (empty without)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    if not parts.password:
        return [parts.username] if parts.username and len(parts.username) >= 8 else []  # a bare token
    return [parts.password, f"{parts.username}:{parts.password}"]


def without_credentials(url: str) -> str:
    """The URL without its userinfo: what logs, manifests and images may name."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def scrubbed(value: Any) -> Any:
    """`value` (JSON-like data: a dumped spec, a base's record) with the credentials taken out of every URL."""
    if isinstance(value, str):
        return without_credentials(value) if "://" in value else value
    if isinstance(value, dict):
        return {k: scrubbed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrubbed(v) for v in value]
    return value
