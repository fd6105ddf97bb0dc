"""Checksums of build outputs and the SHA256SUMS file."""

from __future__ import annotations

import hashlib
import os
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
    tmp = target.with_name("SHA256SUMS.partial")
    tmp.write_text("".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items())))
    os.replace(tmp, target)
    return target
