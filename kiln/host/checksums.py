"""Checksums of build outputs and the SHA256SUMS file."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def file_digests(path: Path, algorithms: Iterable[str] = ("sha256", "sha512")) -> dict[str, str]:
    hashers = {a: hashlib.new(a) for a in algorithms}
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(4 << 20), b""):
            for h in hashers.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashers.items()}


def write_sha256sums(directory: Path, sums: dict[str, str]) -> Path:
    """SHA256SUMS in GNU format (`<hex>  <name>`), written atomically."""
    target = directory / "SHA256SUMS"
    write_replacing(target, "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items())))
    return target


def write_replacing(target: Path, text: str) -> None:
    """Write `target` whole: into a new file of its directory (O_EXCL: never an existing file or a link
    planted there), renamed over `target` (which replaces a link rather than writing through it). For the
    files kiln writes into an output directory, which may be a stranger's."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
