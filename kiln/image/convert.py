"""Disk format conversion with qemu-img."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from kiln.build.plan import digest
from kiln.host.checksums import file_digests
from kiln.host.run import run
from kiln.store.entries import Store

QEMU_IMG_FORMATS = {"qcow2": "qcow2", "raw": "raw", "vmdk": "vmdk", "vhdx": "vhdx", "vdi": "vdi", "vhd": "vpc"}


def convert(raw: Path, out: Path, fmt: str, *, compress: bool = False, options: str | None = None,
            timeout: float = 3600) -> Path:
    """Write `raw` as `fmt` to `out` (via a partial file renamed into place)."""
    partial = out.with_name(out.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        if fmt == "raw":
            run(["cp", "--sparse=always", str(raw), str(partial)], quiet=True, what=f"copy {raw.name}")
        else:
            argv = ["qemu-img", "convert", "-f", "raw", "-O", QEMU_IMG_FORMATS[fmt], "-W"]
            if compress and fmt == "qcow2":
                argv.append("-c")
            if options:
                argv += ["-o", options]
            run([*argv, str(raw), str(partial)], timeout=timeout, quiet=True, what=f"convert to {fmt}")
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return out


@dataclass(frozen=True)
class ImageOutput:
    format: str
    path: Path  # in the store
    sha256: str
    sha512: str
    size: int
    key: str


def convert_key(pack_key: str, fmt: str, compress: bool, options: str | None = None) -> str:

    return digest({"stage": "convert", "pack": pack_key, "format": fmt, "compress": compress and fmt == "qcow2",
                   "options": options})


def converted(store: Store, raw: Path, pack_key: str, fmt: str, *, name: str, compress: bool,
              options: str | None = None, rebuild: bool = False) -> tuple[ImageOutput, bool]:
    """The image in `fmt` from the store, or converted now; (output, whether it came from the store)."""
    key = convert_key(pack_key, fmt, compress, options)
    filename = f"{name}.{fmt}"
    with store.step(key, kind="image", description=filename, rebuild=rebuild) as entry:
        if not entry.cached:
            out = convert(raw, entry.data / filename, fmt, compress=compress, options=options)
            sums = file_digests(out)
            (entry.data / "image.json").write_text(json.dumps({"file": filename, **sums}))
        # read under the key's lock (gc and a --no-cache rebuild of the same key take it); the path is the
        # one the entry has once committed, at the end of this block
        info = json.loads((entry.data / "image.json").read_text())
        size = (entry.data / info["file"]).stat().st_size
    path = store.data(key) / info["file"]
    return ImageOutput(fmt, path, info["sha256"], info["sha512"], size, key), entry.cached
