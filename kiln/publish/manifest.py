"""What a build leaves next to its images: manifest.json, SHA256SUMS (signed, with the SBOMs) and a Markdown
summary."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from kiln.host.checksums import file_digests, write_replacing, write_sha256sums
from kiln.host.run import run
from kiln.model.errors import KilnError
from kiln.model.names import is_plain_name
from kiln.model.record import MANIFEST, SUMS, BuildRecord, SignatureRecord, read_sha256sums
from kiln.publish import signing

log = logging.getLogger("kiln.publish")


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


def write_record(record: BuildRecord, *, seal: bool = False) -> Path:
    """The record as manifest.json in its output directory (written whole, then renamed into place), and
    SHA256SUMS of its images.

    A signed record (one with a `signature`, as every build since the SBOMs) has SHA256SUMS list its images
    and SBOMs (with the digests the record holds, never re-read from the files) and the manifest.json just
    written, signed (SHA256SUMS.gpg, SHA256SUMS.key): `seal` (the build's outputs stage) signs it the first
    time; a later write (boot tests in Nova, publishing) signs it again only when the output is still what
    this key signed (the old signature good, the images', SBOMs' and manifest's digests those it listed), so
    that `kiln verify` holds after a whole build and kiln never signs what someone changed in between."""
    if record.output is None:
        raise ValueError(f"build {record.build_id}: no output directory")
    target = record.output / MANIFEST
    key = signing.signer() if record.signature is not None else None
    if key is not None and not seal:
        why = _changed_since_signed(record, key)
        if why:
            log.warning("%s: not signed again (%s): kiln verify fails on it until it is rebuilt",
                        record.output / SUMS, why)
            key = None
    if key is not None:
        record.signature = signature_record(key)  # kiln's own file names, whatever a loaded manifest said
    text = json.dumps(record.manifest(), indent=2, sort_keys=False, default=str) + "\n"
    write_replacing(target, text)
    sums = {img.file: img.sha256 for img in record.images}
    if record.signature is not None:
        sums.update({s.file: s.sha256 for s in record.sboms if is_plain_name(s.file) and _HEX64.fullmatch(s.sha256)})
        sums[MANIFEST] = hashlib.sha256(text.encode()).hexdigest()
    sums_path = write_sha256sums(record.output, sums)
    if key is not None:
        signing.sign_detached(key, sums_path, record.output / signing.SIGNATURE, record.output / signing.PUBLIC_KEY)
    return target


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _changed_since_signed(record: BuildRecord, key: signing.Signer) -> str | None:
    """Why the output is no longer what `key` signed (None: it is)."""
    assert record.output is not None
    out = record.output
    try:
        sums = read_sha256sums(out / SUMS)
        if not signing.signed_by(key, out / SUMS, out / signing.SIGNATURE):
            return f"{signing.SIGNATURE} is not a good signature by {key.fingerprint}"
        with open(out / MANIFEST, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as fh:
            manifest_digest = hashlib.file_digest(fh, "sha256").hexdigest()
    except (OSError, KilnError) as exc:
        return str(exc).splitlines()[0]
    if sums.get(MANIFEST) != manifest_digest:
        return f"{MANIFEST} changed since it was signed"
    for name, digest in [*((i.file, i.sha256) for i in record.images), *((s.file, s.sha256) for s in record.sboms)]:
        if sums.get(name) != digest:
            return f"{name}: the record's sha256 is not the signed one"
    return None


def signature_record(key: signing.Signer) -> SignatureRecord:
    """What a record says of its signature before the first `write_record` signs it."""
    return SignatureRecord(file=signing.SIGNATURE, key_file=signing.PUBLIC_KEY, fingerprint=key.fingerprint,
                           development=key.development)


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
    if record.sboms or record.signature:
        lines += ["", f"SBOMs: {', '.join(f'`{s.file}` ({s.format})' for s in record.sboms) or 'none'}; "
                  + (f"SHA256SUMS signed by `{record.signature.fingerprint}`"
                     f"{' (development key)' if record.signature.development else ''}" if record.signature
                     else "SHA256SUMS unsigned")]
    return "\n".join(lines) + "\n"


def write_checksum_files(image: Path, *, sha256: str) -> None:
    """<image>.md5 and <image>.sha256 beside the image, as diskimage-builder's --checksum writes them."""
    md5 = file_digests(image, ("md5",))["md5"]
    for ext, digest in (("md5", md5), ("sha256", sha256)):
        write_replacing(image.with_name(f"{image.name}.{ext}"), f"{digest}  {image.name}\n")
