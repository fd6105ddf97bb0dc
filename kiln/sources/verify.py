"""Checksums and signatures of upstream images: what makes a downloaded base trustworthy.

A distribution publishes a checksum file (`SHA256SUMS`, `CHECKSUM`, `SHA512SUMS`) next to its images,
and signs it with GPG, either clearsigned (the file is the signed message) or with a detached
signature beside it (`SHA256SUMS.gpg`, `CHECKSUM.asc`). The chain kiln checks:

    key kiln trusts (shipped in kiln/keys, installed by a distro package, or named in the spec)
      -> signature of the checksum file (`gpgv`, never the user's keyring)
      -> the digest the checksum file lists for the image's name
      -> the bytes of the downloaded image.

Every failure on that chain is a `VerificationError`: retrying cannot fix it, and nothing that failed
it may enter the cache. For clearsigned files only the text inside the signature counts: the checksums
are read from what `gpgv --output` says was signed, never from the raw file (text around a clearsigned
block is not covered by the signature).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kiln.host.run import run
from kiln.model.base import ALGORITHMS as ALGORITHMS
from kiln.model.base import Digest as Digest
from kiln.model.base import normalize_fingerprint as normalize_fingerprint
from kiln.model.errors import KilnError

log = logging.getLogger("kiln.verify")

#: hex length of each supported digest; the order is the order of preference (strongest first)
CLEARSIGN_HEADER = b"-----BEGIN PGP SIGNED MESSAGE-----"
ARMOR_BEGIN = re.compile(r"^-----BEGIN PGP (PUBLIC KEY BLOCK|SIGNATURE|MESSAGE)-----\s*$")


class VerificationError(KilnError):
    """The image, its checksum file or the checksum file's signature is not what upstream published.

    Never retried (a second download of the same bytes fails the same way) and never cached.
    """

    retryable = False


class ChecksumMismatchError(VerificationError):
    """The downloaded bytes do not have the digest the (verified) checksum file lists."""


class ChecksumFileError(VerificationError):
    """The checksum file is malformed, ambiguous, or does not list the image."""


class SignatureError(VerificationError):
    """The checksum file's signature is missing, bad, or made by a key kiln does not trust."""


class UnsignedChecksumError(SignatureError):
    """The checksum file carries no signature and the spec did not opt out of checking one."""


# --------------------------------------------------------------------------------------------------
# digests


def file_digest(path: Path, algorithm: str) -> Digest:
    with open(path, "rb") as fh:
        return Digest(algorithm, hashlib.file_digest(fh, algorithm).hexdigest())


def mismatch_message(what: str, *, expected: Digest, actual: Digest) -> str:
    return (
        f"{what} does not match its checksum:\n  expected {expected}\n  got      {actual}\n"
        "The file was not kept. Upstream changed or a mirror or proxy served other bytes; this is not retried. "
        "If upstream published a new image, its checksum file lists the new digest: build again to pick it up."
    )


# --------------------------------------------------------------------------------------------------
# checksum files

_GNU = re.compile(r"^(?P<hex>[0-9A-Fa-f]{128}|[0-9A-Fa-f]{64}) (?P<mode>[ *^]?)(?P<name>.+)$")
_BSD = re.compile(r"^(?P<algo>SHA-?(?:256|512)) ?\((?P<name>.+)\) ?= ?(?P<hex>[0-9A-Fa-f]+)$", re.IGNORECASE)


def _gnu_unescape(name: str) -> str:
    return name.replace("\\\\", "\0").replace("\\n", "\n").replace("\\r", "\r").replace("\0", "\\")


def _clean_name(name: str) -> str:
    name = name.strip()
    while name.startswith("./"):
        name = name[2:]
    return name


@dataclass
class ChecksumFile:
    """Digests by file name, from one checksum file (GNU and BSD lines may mix)."""

    source: str
    entries: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {algorithm: hex}

    def add(self, name: str, algorithm: str, hexdigest: str, lineno: int) -> None:
        known = self.entries.setdefault(name, {})
        hexdigest = hexdigest.lower()
        if known.get(algorithm, hexdigest) != hexdigest:
            raise ChecksumFileError(
                f"{self.source} line {lineno}: {name!r} is listed twice with different {algorithm} digests"
            )
        known[algorithm] = hexdigest

    def lookup(self, filename: str) -> Digest:
        """The strongest digest listed for `filename` (matched by exact name, then by base name)."""
        found = self.entries.get(filename)
        if found is None:
            base = os.path.basename(filename)
            matches = {n: d for n, d in self.entries.items() if os.path.basename(n) == base}
            if len(matches) > 1:
                raise ChecksumFileError(
                    f"{self.source} lists {base!r} more than once ({', '.join(sorted(matches))}): "
                    "name the exact entry in the image URL"
                )
            found = next(iter(matches.values()), None)
        if found is None:
            listed = ", ".join(sorted(self.entries)[:8]) or "nothing"
            more = " …" if len(self.entries) > 8 else ""
            raise ChecksumFileError(
                f"{self.source} does not list {filename!r} (it lists {listed}{more}); "
                "is the image name or the checksum URL wrong?"
            )
        for algorithm in ALGORITHMS:
            if algorithm in found:
                return Digest(algorithm, found[algorithm])
        raise ChecksumFileError(f"{self.source}: no supported digest for {filename!r}")  # pragma: no cover


def parse_checksum_file(text: str, *, source: str) -> ChecksumFile:
    """Parse GNU (`HEX  name`, `HEX *name`) and BSD (`SHA256 (name) = HEX`) lines.

    Comments (`#`), blank lines and PGP armor lines are skipped; any other line is an error, so a
    file in an unknown format fails loudly instead of silently verifying nothing. For GNU lines the
    algorithm follows from the digest's length.
    """
    result = ChecksumFile(source)
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#") or line.startswith("-----") or line.lower().startswith("hash:"):
            continue
        m = _BSD.match(line)
        if m:
            algorithm = m.group("algo").lower().replace("-", "")
            hexdigest = m.group("hex")
            if len(hexdigest) != ALGORITHMS[algorithm]:
                raise ChecksumFileError(f"{source} line {lineno}: {algorithm} digest has the wrong length")
            result.add(_clean_name(m.group("name")), algorithm, hexdigest, lineno)
            continue
        escaped = line.startswith("\\")
        m = _GNU.match(line[1:] if escaped else line)
        if m:
            hexdigest = m.group("hex")
            algorithm = next(a for a, n in ALGORITHMS.items() if n == len(hexdigest))
            name = m.group("name")
            result.add(_clean_name(_gnu_unescape(name) if escaped else name), algorithm, hexdigest, lineno)
            continue
        raise ChecksumFileError(
            f"{source} line {lineno} is neither a GNU (`HEX  name`) nor a BSD (`SHA256 (name) = HEX`) "
            f"checksum line: {line[:80]!r}"
        )
    if not result.entries:
        raise ChecksumFileError(f"{source} lists no checksums")
    return result


def is_clearsigned(data: bytes) -> bool:
    return data.lstrip().startswith(CLEARSIGN_HEADER)


# --------------------------------------------------------------------------------------------------
# keys


def dearmor(text: str) -> bytes:
    """The binary OpenPGP packets of every ASCII-armored block in `text` (gpgv 2.2 reads binary only)."""
    out = bytearray()
    lines = text.splitlines()
    i = 0
    found = False
    while i < len(lines):
        if not ARMOR_BEGIN.match(lines[i].strip()):
            i += 1
            continue
        found = True
        i += 1
        while i < len(lines) and lines[i].strip() and ":" in lines[i]:  # armor headers (Version: …)
            i += 1
        body: list[str] = []
        while i < len(lines) and not lines[i].startswith("-----END"):
            line = lines[i].strip()
            if line.startswith("=") and len(line) == 5:  # the CRC24 checksum line
                pass
            elif line:
                body.append(line)
            i += 1
        try:
            out += base64.b64decode("".join(body), validate=True)
        except binascii.Error as exc:
            raise SignatureError(f"a key block is not valid ASCII armor: {exc}") from exc
        i += 1
    if not found:
        raise SignatureError("no `-----BEGIN PGP PUBLIC KEY BLOCK-----` in the armored key file")
    return bytes(out)


def binary_keyring(path: Path, workdir: Path) -> Path:
    """`path` itself if it holds binary keys, else a dearmored copy in `workdir`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot read the keyring {path}: {exc.strerror}") from exc
    if not data.lstrip().startswith(b"-----BEGIN"):
        return path.resolve()
    out = workdir / f"{path.name}.dearmored.gpg"
    out.write_bytes(dearmor(data.decode("ascii", errors="replace")))
    return out.resolve()


# --------------------------------------------------------------------------------------------------
# signatures


@dataclass(frozen=True)
class SignatureCheck:
    """A good signature: who made it and exactly which bytes it covers."""

    fingerprint: str  # the signing (sub)key
    primary: str  # its primary key: what fingerprint pins name
    signed: bytes  # the checksum file's signed content (for clearsigned files: only the signed text)
    kind: str  # "detached" or "clearsigned"


@dataclass
class _Sig:
    status: list[list[str]] = field(default_factory=list)

    def has(self, keyword: str) -> bool:
        return any(s[0] == keyword for s in self.status)

    def first(self, keyword: str) -> list[str] | None:
        return next((s for s in self.status if s[0] == keyword), None)


def _parse_status(lines: Sequence[str]) -> tuple[list[_Sig], set[str]]:
    sigs: list[_Sig] = []
    seen: set[str] = set()
    for line in lines:
        if not line.startswith("[GNUPG:] "):
            continue
        words = line.split()[1:]
        if not words:
            continue
        seen.add(words[0])
        if words[0] == "NEWSIG" or not sigs:
            sigs.append(_Sig())
        if words[0] != "NEWSIG":
            sigs[-1].status.append(words)
    return sigs, seen


def verify_signature(
    data: Path,
    *,
    signature: Path | None,
    keyrings: Sequence[Path],
    fingerprints: Collection[str] = (),
    workdir: Path,
    what: str,
) -> SignatureCheck:
    """Check `data` (a checksum file) with `gpgv` against `keyrings` only.

    `signature` is the detached signature; without it `data` must be clearsigned. `fingerprints`,
    when given, pins the primary keys (or signing subkeys) whose signatures count: a good signature
    by another key in the keyring is refused. Several signatures may be present (upstreams rotate
    keys by signing with old and new); one good, pinned one suffices, and any BAD one fails.
    """
    if not keyrings:
        raise SignatureError(f"{what}: no keyring to check the signature against")
    pins = {normalize_fingerprint(f) for f in fingerprints}
    workdir.mkdir(parents=True, exist_ok=True)
    raw = data.read_bytes()
    kind = "detached" if signature is not None else "clearsigned"
    if signature is None and not is_clearsigned(raw):
        raise UnsignedChecksumError(f"{what}: {data.name} is not clearsigned and no detached signature was given")
    with tempfile.TemporaryDirectory(prefix="gnupg.", dir=workdir) as tmp:  # never the user's keyring
        home = Path(tmp)
        os.chmod(home, 0o700)
        argv: list[str] = ["gpgv", "--homedir", str(home), "--status-fd", "1"]
        for ring in keyrings:
            argv += ["--keyring", str(binary_keyring(ring, home))]
        plain = home / "signed-content"
        argv += ["--output", str(plain), str(data)] if signature is None else [str(signature), str(data)]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "GNUPGHOME": str(home)}
        result = run(argv, env=env, check=False, quiet=True, timeout=120,
                     what=f"check the signature of {what} (gpgv)")
        signed = plain.read_bytes() if signature is None and plain.exists() else raw
    sigs, seen = _parse_status(result.lines)
    human = [line for line in result.lines if not line.startswith("[GNUPG:]")]
    detail = ("\n  gpgv said:\n" + "\n".join(f"    {line}" for line in human[-8:])) if human else ""

    if signature is not None and "PLAINTEXT" in seen:
        # `gpgv SIG DATA` with a complete signed message as SIG verifies that message and ignores DATA
        raise SignatureError(
            f"{what}: {signature.name} is a signed message, not a detached signature of {data.name}: "
            f"it does not vouch for {data.name}{detail}"
        )
    if "NODATA" in seen and not sigs:
        raise SignatureError(f"{what}: no OpenPGP signature found in {(signature or data).name}{detail}")
    bad = [s for s in sigs if s.has("BADSIG")]
    if bad:
        first = bad[0].first("BADSIG") or []
        key = first[1] if len(first) > 1 else "?"
        raise SignatureError(
            f"{what}: BAD signature (key {key}): {data.name} was changed after it was signed, or the signature "
            f"belongs to another file{detail}"
        )
    good: list[tuple[str, str]] = []
    refused: list[str] = []
    for s in sigs:
        valid = s.first("VALIDSIG")
        if not (s.has("GOODSIG") and valid and len(valid) >= 2):
            continue
        fpr, primary = valid[1].upper(), valid[-1].upper()
        if pins and fpr not in pins and primary not in pins:
            refused.append(primary)
            continue
        good.append((fpr, primary))
    if not good:
        if refused:
            raise SignatureError(
                f"{what}: signed by {', '.join(refused)}, which is not a pinned key "
                f"(expected {', '.join(sorted(pins))}){detail}"
            )
        for s in sigs:
            for keyword, why in (
                ("REVKEYSIG", "by a REVOKED key"),
                ("EXPKEYSIG", "by an EXPIRED key: get the key's current version (its expiry may have been extended)"),
                ("EXPSIG", "with an expired signature"),
            ):
                hit = s.first(keyword)
                if hit:
                    raise SignatureError(f"{what}: signed {why} ({hit[1] if len(hit) > 1 else '?'}){detail}")
        missing = [s.first("ERRSIG") for s in sigs if s.has("ERRSIG")]
        if missing:
            keys = ", ".join((m[-1] if m and len(m) >= 8 else (m[1] if m and len(m) > 1 else "?")) for m in missing)
            raise SignatureError(
                f"{what}: signed by {keys}, which is in none of the trusted keyrings "
                f"({', '.join(str(k) for k in keyrings)}){detail}"
            )
        raise SignatureError(f"{what}: no good signature (gpgv exited with {result.returncode}){detail}")
    if result.returncode != 0:
        log.debug("%s: gpgv exited %s but a pinned signature is good (others unverifiable)", what, result.returncode)
    fpr, primary = good[0]
    log.info("%s: good %s signature by %s", what, kind, primary)
    return SignatureCheck(fingerprint=fpr, primary=primary, signed=signed, kind=kind)
