"""The one rule for names kiln turns into paths, object keys and image names: a plain name (letters, digits,
'.', '_', '+', '-'; no '/', no '..', not empty)."""

from __future__ import annotations

import re

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def is_plain_name(value: str) -> bool:
    return bool(NAME_RE.fullmatch(value)) and ".." not in value  # fullmatch: `$` would let a final \n in


def check_name(value: str, what: str) -> str:
    if not is_plain_name(value):
        raise ValueError(f"{what} {value!r} may only contain letters, digits, '.', '_', '+', '-'")
    return value
