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


def qemu_img_argv(fmt: str, compression: str = "none", options: str | None = None) -> list[str]:
    """The `qemu-img convert` options from a raw disk to `fmt`: out-of-order writes (-W); a qcow2 compressed
    with `compression` (zstd or zlib; `none` leaves it plain), unless the spec's own options name a type."""
    argv = ["-f", "raw", "-O", QEMU_IMG_FORMATS[fmt], "-W"]
    opts = [o for o in (options or "").split(",") if o]
    if fmt == "qcow2" and compression != "none":
        argv.append("-c")
        if not any(o.startswith("compression_type=") for o in opts):
            opts.insert(0, f"compression_type={compression}")
    return argv + (["-o", ",".join(opts)] if opts else [])


def convert(raw: Path, out: Path, fmt: str, *, compression: str = "none", options: str | None = None,
            timeout: float = 3600) -> Path:
    """Write `raw` as `fmt` to `out` (via a partial file renamed into place)."""
    partial = out.with_name(out.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        if fmt == "raw":
            run(["cp", "--sparse=always", str(raw), str(partial)], quiet=True, what=f"copy {raw.name}")
        else:
            argv = ["qemu-img", "convert", *qemu_img_argv(fmt, compression, options), str(raw), str(partial)]
            what = f"convert to {fmt}" + (f" ({compression})" if fmt == "qcow2" and compression != "none" else "")
            run(argv, timeout=timeout, quiet=True, what=what)
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


def convert_key(pack_key: str, fmt: str, compression: str, options: str | None = None) -> str:
    return digest({"stage": "convert", "pack": pack_key, "format": fmt,
                   "compression": compression if fmt == "qcow2" else "none", "options": options})


def converted(store: Store, raw: Path, pack_key: str, fmt: str, *, name: str, compression: str,
              options: str | None = None, rebuild: bool = False) -> tuple[ImageOutput, bool]:
    """The image in `fmt` from the store, or converted now; (output, whether it came from the store)."""
    key = convert_key(pack_key, fmt, compression, options)
    filename = f"{name}.{fmt}"
    with store.step(key, kind="image", description=filename, rebuild=rebuild) as entry:
        if not entry.cached:
            with store.holding([pack_key]):  # the raw disk it reads stays while it reads it
                out = convert(raw, entry.data / filename, fmt, compression=compression, options=options)
            sums = file_digests(out)
            (entry.data / "image.json").write_text(json.dumps({"file": filename, **sums}))
        # read under the key's lock (gc and a --no-cache rebuild of the same key take it); the path is the
        # one the entry has once committed, at the end of this block
        info = json.loads((entry.data / "image.json").read_text())
        size = (entry.data / info["file"]).stat().st_size
    path = store.data(key) / info["file"]
    return ImageOutput(fmt, path, info["sha256"], info["sha512"], size, key), entry.cached
