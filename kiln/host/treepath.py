"""Paths inside an untrusted tree, resolved as if the tree were `/` (openat2's RESOLVE_IN_ROOT, by hand).

An image tree is a stranger's: a symlink in it (`boot/vmlinuz -> /etc/shadow`, `usr -> ../../..`) must
never make kiln read a host file. Every component is looked at with lstat; a link's target is resolved
again from the tree's root (absolute targets) or its own directory (relative ones), and `..` never climbs
above the root. Nothing runs in the tree while kiln reads it, so checking, then opening, is safe.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path, PurePosixPath

MAX_LINKS = 40  # as the kernel's


def resolve_in_root(root: Path, rel: str | PurePosixPath) -> Path:
    """`rel` inside `root`, its symlinks resolved within `root`: a path under `root` with no link in it
    (its last components may not exist). OSError(ELOOP) after too many links."""
    pending = [p for p in PurePosixPath(rel).parts if p not in ("/", "", ".")]
    done: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        here = root.joinpath(*done, part)
        try:
            st = os.lstat(here)
        except (FileNotFoundError, NotADirectoryError):
            return root.joinpath(*done, part, *[p for p in pending if p not in ("", ".")])
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_LINKS:
                raise OSError(errno.ELOOP, f"too many symbolic links below {root}", str(rel))
            target = PurePosixPath(os.readlink(here))
            if target.is_absolute():
                done = []
            pending = [p for p in target.parts if p not in ("/", "", ".")] + pending
            continue
        done.append(part)
    return root.joinpath(*done)


def regular_file_in_root(root: Path, rel: str | PurePosixPath) -> Path | None:
    """The regular file `rel` names inside `root` (links resolved within it), or None."""
    try:
        path = resolve_in_root(root, rel)
        return path if stat.S_ISREG(os.lstat(path).st_mode) else None
    except OSError:
        return None
