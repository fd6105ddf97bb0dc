"""`kiln verify OUTPUT`: is a build's output directory what kiln signed?

    trusted key (the operator's KILN_SIGNING_KEY, this host's development key, --keyring FILE, or the
    output's own SHA256SUMS.key only when --key pins its fingerprint)
      -> SHA256SUMS.gpg, a detached signature of SHA256SUMS (gpgv, a throwaway home)
      -> every file SHA256SUMS lists: a plain name in OUTPUT, a regular file, its sha256
      -> every image and SBOM in OUTPUT (and manifest.json) listed in SHA256SUMS
      -> manifest.json read as a build record (its images' sha256 are SHA256SUMS's)
      -> both SBOMs valid by their libraries' own validators, listing exactly the manifest's packages.

The directory is treated as hostile: nothing in it is followed through a link (a link is itself an error),
no name in SHA256SUMS may leave it, and every failure is a VerifyError naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kiln.model.base import normalize_fingerprint
from kiln.model.errors import KilnError
from kiln.model.names import is_plain_name
from kiln.model.record import MANIFEST, SUMS, BuildRecord, RecordError
from kiln.publish.sbom import (
    CYCLONEDX_FORMAT,
    SBOM_SUFFIXES,
    SPDX_FORMAT,
    SbomError,
    compare_packages,
    cyclonedx_packages,
    spdx_packages,
)
from kiln.publish.signing import PUBLIC_KEY, SIGNATURE, SigningError, TrustedKey, default_trusted_keys
from kiln.sources.verify import SignatureError, verify_signature

log = logging.getLogger("kiln.publish")

# the files of an output that must be in SHA256SUMS: manifest.json, images and SBOMs
IMAGE_SUFFIXES = (".qcow2", ".raw", ".img", ".vmdk", ".vdi", ".vhd", ".vhdx", ".iso")
SMALL_FILE_MAX = 64 << 20  # SHA256SUMS, its signature, a key, an SBOM
_SUMS_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


class VerifyError(KilnError):
    """The output is not what was signed: the message names the file and what is wrong."""


class VerifyInputError(VerifyError):
    """kiln verify was not given what it needs (no key to trust, a bad fingerprint): bad input."""

    exit_code = 2


@dataclass
class VerifyReport:
    output: Path
    signer: str  # the signing key's primary fingerprint
    trusted: str  # which trusted key that is
    files: list[str] = field(default_factory=list)  # checked against SHA256SUMS
    sboms: list[str] = field(default_factory=list)  # FILE (format)
    packages: int = 0
    not_covered: list[str] = field(default_factory=list)  # other files in OUTPUT (console logs, …)


class _Dir:
    """The output directory, opened once: files are opened relative to it and never through a link."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise VerifyInputError(f"{path}: {exc.strerror} (not a build's output directory)") from None

    def close(self) -> None:
        os.close(self.fd)

    def open(self, name: str) -> int:
        """A file descriptor of `name`, a regular file directly in the directory, never a link."""
        if not is_plain_name(name):
            raise VerifyError(f"{self.path / SUMS}: {name[:80]!r} is not a plain file name in {self.path} "
                              "(no '/', no '..'): refused")
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=self.fd)
        except FileNotFoundError:
            raise VerifyError(f"{self.path / name}: missing (listed in {SUMS})") from None
        except OSError as exc:
            raise VerifyError(f"{self.path / name}: cannot open: {exc.strerror} (a link is never followed)") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise VerifyError(f"{self.path / name}: not a regular file: refused")
        return fd

    def read(self, name: str, limit: int = SMALL_FILE_MAX) -> bytes:
        with os.fdopen(self.open(name), "rb") as fh:
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise VerifyError(f"{self.path / name}: larger than {limit >> 20} MiB: not what kiln writes")
        return data

    def sha256(self, name: str) -> str:
        with os.fdopen(self.open(name), "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()


def parse_sums(text: str, where: Path) -> dict[str, str]:
    """SHA256SUMS: `HEX  NAME` lines, every NAME a plain file name, each once."""
    sums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _SUMS_LINE.match(line)
        if not m:
            raise VerifyError(f"{where}:{number}: not a SHA256SUMS line (lowercase hex, two spaces, file name)")
        name = m.group(2)
        if not is_plain_name(name):
            raise VerifyError(f"{where}:{number}: {name[:80]!r} is not a plain file name in the output "
                              "(no '/', no '..'): refused")
        if name in sums:
            raise VerifyError(f"{where}:{number}: {name} is listed twice")
        sums[name] = m.group(1)
    if not sums:
        raise VerifyError(f"{where}: lists no files")
    return sums


def _must_be_listed(name: str) -> bool:
    """An image (in any case, compressed or not: `x.QCOW2`, `x.qcow2.zst`), an SBOM or the manifest."""
    lower = name.lower()
    return (lower == MANIFEST or any(suffix in lower for suffix in IMAGE_SUFFIXES)
            or lower.endswith(SBOM_SUFFIXES))


def verify_output(output: Path, *, keyring: Path | None = None, key: str | None = None,
                  default_keys: Callable[[Path], list[TrustedKey]] = default_trusted_keys) -> VerifyReport:
    """Check `output` (see the module's doc); VerifyError on the first thing that is wrong."""
    pin = None
    if key is not None:
        try:
            pin = normalize_fingerprint(key)
        except ValueError as exc:
            raise VerifyInputError(f"--key: {exc}") from None
    directory = _Dir(output)
    try:
        with tempfile.TemporaryDirectory(prefix="kiln-verify.") as tmp:
            work = Path(tmp)
            return _verify(directory, work, keyring=keyring, pin=pin, default_keys=default_keys)
    finally:
        directory.close()


def _trusted(directory: _Dir, work: Path, *, keyring: Path | None, pin: str | None,
             default_keys: Callable[[Path], list[TrustedKey]]) -> list[TrustedKey]:
    if keyring is not None:
        if not keyring.is_file():
            raise VerifyInputError(f"--keyring {keyring}: no such file")
        return [TrustedKey(keyring, f"--keyring {keyring}")]
    try:
        keys = default_keys(work)
    except SigningError as exc:
        raise VerifyInputError(str(exc)) from None
    if pin is not None:
        # the output's own key counts only as the key with the pinned fingerprint (verify_signature pins it)
        shipped = work / "shipped-key.asc"
        try:
            shipped.write_bytes(directory.read(PUBLIC_KEY))
        except VerifyError as exc:
            raise VerifyError(f"{exc} (--key {pin} without --keyring trusts the output's {PUBLIC_KEY} with that "
                              "fingerprint)") from None
        keys.append(TrustedKey(shipped, f"the output's {PUBLIC_KEY}, pinned by --key"))
    if not keys:
        raise VerifyInputError(f"no key to trust: {directory.path} was signed on another host, or this host has no "
                               "signing key; give --keyring FILE (the signer's public key) or --key FINGERPRINT "
                               f"(to trust the output's own {PUBLIC_KEY} with that fingerprint)")
    return keys


def _verify(directory: _Dir, work: Path, *, keyring: Path | None, pin: str | None,
            default_keys: Callable[[Path], list[TrustedKey]]) -> VerifyReport:
    out = directory.path
    # 1. the signature of SHA256SUMS, on copies read without following links
    sums_bytes = directory.read(SUMS) if _exists(directory, SUMS) else None
    if sums_bytes is None:
        raise VerifyError(f"{out / SUMS}: missing: not a signed kiln output")
    if not _exists(directory, SIGNATURE):
        raise VerifyError(f"{out / SIGNATURE}: missing: {SUMS} is not signed")
    (work / SUMS).write_bytes(sums_bytes)
    (work / SIGNATURE).write_bytes(directory.read(SIGNATURE))
    trusted = _trusted(directory, work, keyring=keyring, pin=pin, default_keys=default_keys)
    try:
        check = verify_signature(work / SUMS, signature=work / SIGNATURE, keyrings=[k.path for k in trusted],
                                 fingerprints=[pin] if pin else (), workdir=work / "gpgv",
                                 what=str(out / SIGNATURE))
    except SignatureError as exc:
        raise VerifyError(str(exc).splitlines()[0]) from None
    which = f"the fingerprint --key pins, among {', '.join(k.what for k in trusted)}" if pin else \
        ", ".join(k.what for k in trusted)
    report = VerifyReport(output=out, signer=check.primary, trusted=which)

    # 2. every listed file, by its bytes
    try:
        text = sums_bytes.decode()
    except UnicodeDecodeError:
        raise VerifyError(f"{out / SUMS}: not UTF-8 text") from None
    sums = parse_sums(text, out / SUMS)
    for name, digest in sorted(sums.items()):
        if directory.sha256(name) != digest:
            raise VerifyError(f"{out / name}: its sha256 differs from {SUMS}'s: the file changed after it was "
                              "signed")
        report.files.append(name)

    # 3. everything in the directory: no links; every image, SBOM and manifest.json listed
    for entry in sorted(os.scandir(directory.fd), key=lambda e: e.name):
        if entry.is_symlink():
            raise VerifyError(f"{out / entry.name}: a symbolic link in the output: refused")
        if entry.name in sums or entry.name in (SUMS, SIGNATURE, PUBLIC_KEY):
            continue
        if entry.is_dir(follow_symlinks=False):
            report.not_covered.append(entry.name + "/")
            continue
        if _must_be_listed(entry.name):
            raise VerifyError(f"{out / entry.name}: not listed in {SUMS}: it was not signed")
        report.not_covered.append(entry.name)
    if MANIFEST not in sums:
        raise VerifyError(f"{out / SUMS}: does not list {MANIFEST}")

    # 4. the manifest (its images are SHA256SUMS's) and the SBOMs it names
    try:
        record = BuildRecord.load(out)
    except RecordError as exc:
        raise VerifyError(str(exc)) from None
    for image in record.images:  # the images the manifest describes are the ones SHA256SUMS lists
        if sums.get(image.file) != image.sha256:
            raise VerifyError(f"{out / image.file}: not in {SUMS} with the sha256 {MANIFEST} records")
    formats = {s.format: s for s in record.sboms}
    for fmt in (SPDX_FORMAT, CYCLONEDX_FORMAT):
        if fmt not in formats:
            raise VerifyError(f"{out / MANIFEST}: names no {fmt} SBOM")
    for sbom in record.sboms:
        if sums.get(sbom.file) != sbom.sha256:
            raise VerifyError(f"{out / sbom.file}: not in {SUMS} with the sha256 {MANIFEST} records")
        where = str(out / sbom.file)
        try:
            sbom_text = directory.read(sbom.file).decode()
        except UnicodeDecodeError:
            raise VerifyError(f"{where}: not UTF-8 text") from None
        try:
            listed = spdx_packages(sbom_text, where) if sbom.format.startswith("spdx") else \
                cyclonedx_packages(sbom_text, where)
            compare_packages(listed, record.packages, where)
        except SbomError as exc:
            raise VerifyError(str(exc)) from None
        report.sboms.append(f"{sbom.file} ({sbom.format})")
    report.packages = len(record.packages)
    return report


def _exists(directory: _Dir, name: str) -> bool:
    try:
        os.stat(name, dir_fd=directory.fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True
