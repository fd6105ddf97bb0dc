"""Shell variable assignments (`NAME=value` files such as /etc/default/grub) read as a shell would assign
them, without running anything."""

from __future__ import annotations

import re
from collections.abc import Mapping

_ASSIGNMENT = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _expand(text: str, i: int, env: Mapping[str, str]) -> tuple[str, int]:
    """Expand `$NAME` or `${NAME}` at text[i] == '$'; anything fancier stays literal."""
    if text.startswith("${", i):
        close = text.find("}", i)
        if close != -1 and _NAME.fullmatch(text[i + 2 : close]):
            return env.get(text[i + 2 : close], ""), close + 1
        return "$", i + 1
    m = _NAME.match(text, i + 1)
    if m:
        return env.get(m.group(), ""), m.end()
    return "$", i + 1


def _shell_word(text: str, env: Mapping[str, str]) -> str:
    """The value of the first shell word in `text`: quotes, backslashes and $VAR; stops at a blank."""
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c in " \t;&|":
            break
        if c == "'":
            close = text.find("'", i + 1)
            close = len(text) if close == -1 else close
            out.append(text[i + 1 : close])
            i = close + 1
        elif c == '"':
            i += 1
            while i < len(text) and text[i] != '"':
                if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in '$`"\\':
                    out.append(text[i + 1])
                    i += 2
                elif text[i] == "$":
                    value, i = _expand(text, i, env)
                    out.append(value)
                else:
                    out.append(text[i])
                    i += 1
            i += 1
        elif c == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        elif c == "$":
            value, i = _expand(text, i, env)
            out.append(value)
        else:
            out.append(c)
            i += 1
    return "".join(out)


def parse_shell_assignments(text: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Read `NAME=value` lines as a shell would assign them, without running anything.

    Later assignments win and may refer to earlier ones (`X="$X quiet"`); conditionals are not
    evaluated, command substitutions stay literal.
    """
    values = dict(env or {})
    for line in text.replace("\\\n", "").splitlines():
        m = _ASSIGNMENT.match(line)
        if m:
            values[m.group(1)] = _shell_word(m.group(2), values)
    return values

