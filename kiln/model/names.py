"""The one rule for names kiln turns into paths, object keys and image names: a plain name (letters, digits,
'.', '_', '+', '-'; no '/', no '..', not empty, at most NAME_MAX)."""

from __future__ import annotations

import re

NAME_MAX = 128  # well under a file name's 255 bytes and Glance's 255 characters, with room for suffixes
NAME_RE = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._+-]{{0,{NAME_MAX - 1}}}$")


def is_plain_name(value: str) -> bool:
    return bool(NAME_RE.fullmatch(value)) and ".." not in value  # fullmatch: `$` would let a final \n in


def check_name(value: str, what: str) -> str:
    if not is_plain_name(value):
        shown = value if len(value) <= 80 else value[:60] + f"… ({len(value)} characters)"
        raise ValueError(f"{what} {shown!r} may only contain letters, digits, '.', '_', '+', '-', "
                         f"at most {NAME_MAX} of them")
    return value
