"""What a build leaves next to its images: manifest.json, SHA256SUMS and a Markdown summary."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from kiln.host.checksums import file_digests, write_replacing, write_sha256sums
from kiln.host.run import run
from kiln.model.record import MANIFEST, BuildRecord


def install_file(src: Path, dest: Path) -> Path:
    """Copy a store file into the output directory under a partial name, then rename into place."""
    partial = dest.with_name(dest.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        # sparse-aware copy; the store keeps its own copy so the user may modify the output freely
        shutil.copyfile(src, partial) if src.stat().st_size < (1 << 20) else _cp_sparse(src, partial)
        os.replace(partial, dest)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return dest


def _cp_sparse(src: Path, dest: Path) -> None:
    run(["cp", "--sparse=always", "--reflink=auto", str(src), str(dest)], quiet=True, what=f"copy {src.name}")


def write_record(record: BuildRecord) -> Path:
    """The record as manifest.json in its output directory (written whole, then renamed into place), and
    SHA256SUMS of its images."""
    if record.output is None:
        raise ValueError(f"build {record.build_id}: no output directory")
    target = record.output / MANIFEST
    write_replacing(target, json.dumps(record.manifest(), indent=2, sort_keys=False, default=str) + "\n")
    write_sha256sums(record.output, {img.file: img.sha256 for img in record.images})
    return target


def markdown_summary(record: BuildRecord) -> str:
    spec = record.spec
    lines = [
        f"# {spec['name']}",
        "",
        f"{spec['distro']} {spec['release']} {spec['arch']}, build `{record.build_id}`, "
        f"{len(record.packages)} packages, elements: {', '.join(e.name for e in record.elements)}",
        "",
        "| image | size | sha256 |",
        "|---|---:|---|",
    ]
    for img in record.images:
        lines.append(f"| {img.file} | {img.size / 1024**2:.0f} MiB | `{img.sha256[:16]}…` |")
    lines += ["", "| stage | seconds | cached |", "|---|---:|---|"]
    for stage, t in record.timings.items():
        lines.append(f"| {stage} | {t.seconds:.1f} | {'yes' if t.cached else 'no'} |")
    if record.boot_test:
        lines += ["", "| boot test | result | seconds | accel | root fs grown to |", "|---|---|---:|---|---:|"]
        for b in record.boot_test:
            grown = f"{b.root_bytes / 1024**3:.1f} GiB" if b.root_bytes else "?"
            lines.append(f"| {b.firmware} | {'passed' if b.passed else 'FAILED'} | {b.seconds:.0f} | "
                         f"{b.accel} | {grown} |")
    else:
        lines += ["", "Boot test: skipped."]
    return "\n".join(lines) + "\n"


def write_checksum_files(image: Path, *, sha256: str) -> None:
    """<image>.md5 and <image>.sha256 beside the image, as diskimage-builder's --checksum writes them."""
    md5 = file_digests(image, ("md5",))["md5"]
    for ext, digest in (("md5", md5), ("sha256", sha256)):
        write_replacing(image.with_name(f"{image.name}.{ext}"), f"{digest}  {image.name}\n")
