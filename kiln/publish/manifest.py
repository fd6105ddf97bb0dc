"""What a build leaves next to its images: manifest.json, SHA256SUMS and a Markdown summary."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from kiln import __version__
from kiln.host.checksums import file_digests, write_sha256sums


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
    from kiln.host.run import run

    run(["cp", "--sparse=always", "--reflink=auto", str(src), str(dest)], quiet=True, what=f"copy {src.name}")


def write_manifest(output: Path, manifest: dict[str, Any]) -> Path:
    target = output / "manifest.json"
    tmp = target.with_name("manifest.json.partial")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, target)
    return target


def write_checksums(output: Path, images: list[dict[str, Any]]) -> Path:
    return write_sha256sums(output, {img["file"]: img["sha256"] for img in images})


def base_manifest(*, build_id: str) -> dict[str, Any]:
    return {"kiln_version": __version__, "build_id": build_id}


def markdown_summary(manifest: dict[str, Any]) -> str:
    spec = manifest["spec"]
    lines = [
        f"# {spec['name']}",
        "",
        f"{spec['distro']} {spec['release']} {spec['arch']}, build `{manifest['build_id']}`, "
        f"{len(manifest.get('packages', []))} packages, elements: {', '.join(e['name'] for e in manifest['elements'])}",
        "",
        "| image | size | sha256 |",
        "|---|---:|---|",
    ]
    for img in manifest["images"]:
        lines.append(f"| {img['file']} | {img['size'] / 1024**2:.0f} MiB | `{img['sha256'][:16]}…` |")
    lines += ["", "| stage | seconds | cached |", "|---|---:|---|"]
    for stage, t in manifest["timings"].items():
        lines.append(f"| {stage} | {t['seconds']:.1f} | {'yes' if t['cached'] else 'no'} |")
    boots = manifest.get("boot_test") or []
    if boots:
        lines += ["", "| boot test | result | seconds | accel | root fs grown to |", "|---|---|---:|---|---:|"]
        for b in boots:
            grown = f"{b['root_bytes'] / 1024**3:.1f} GiB" if b.get("root_bytes") else "?"
            lines.append(f"| {b['firmware']} | {'passed' if b['passed'] else 'FAILED'} | {b['seconds']:.0f} | "
                         f"{b['accel']} | {grown} |")
    else:
        lines += ["", "Boot test: skipped."]
    return "\n".join(lines) + "\n"


def write_checksum_files(image: Path, *, sha256: str) -> None:
    """<image>.md5 and <image>.sha256 beside the image, as diskimage-builder's --checksum writes them."""
    md5 = file_digests(image, ("md5",))["md5"]
    for ext, digest in (("md5", md5), ("sha256", sha256)):
        image.with_name(f"{image.name}.{ext}").write_text(f"{digest}  {image.name}\n")
