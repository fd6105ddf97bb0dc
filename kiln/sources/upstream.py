"""Upstream cloud images as a base: resolving the spec's `base:` block against where each distribution
publishes its images, then fetching and verifying them. The data (`UPSTREAMS`, `BaseSpec`) lives in
kiln/model/base.py.

Each distribution's publication is data (`UPSTREAMS`): URL templates for the image and its checksum
file, the checksum file's signature and the key that makes it, the architecture names. A spec's
`base:` block (`BaseSpec`) picks one of them or names its own URLs; `resolve_base()` merges the two
into the concrete files to fetch. Then, in the order `fetch_base` runs them:

    resolved = resolve_base(spec.base, distro=…, release=…, arch=…)
    pinned = pin_base(resolved, workdir)          # checksum file (+ signature) fetched and verified:
                                                  # the image's digest, trusted before its bytes exist
    key = base_key_fields(pinned)                 # the cache key: the verified digest, not the URL
    image = fetch_image(pinned, downloads_dir)    # cached by digest; mismatch -> ChecksumMismatchError
    extract_rootfs(image.path, tree, workdir=…, format=pinned.base.format, arch=…)

DIB scrapes an HTML listing for "latest" and checks checksums without signatures; kiln never scrapes
(an upstream without a stable "latest" name needs `base.version`), and refuses an unsigned checksum
file unless the spec pins the digest itself (`checksum:`) or opts out (`insecure_skip_signature`).
"""

from __future__ import annotations

import logging
import os
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.model.base import UPSTREAMS as UPSTREAMS  # the catalog, as this module's API too
from kiln.model.base import URL_RE, BaseFormat, Digest, Signing, as_list, guess_format, url_filename
from kiln.model.base import BaseSpec as BaseSpec
from kiln.model.errors import SpecError
from kiln.sources.download import DownloadResult, RetryPolicy, download
from kiln.sources.extract import EXTRACT_VERSION
from kiln.sources.verify import (
    SignatureError,
    UnsignedChecksumError,
    is_clearsigned,
    parse_checksum_file,
    verify_signature,
)

log = logging.getLogger("kiln.upstream")

UPSTREAM_VERSION = "1"  # bump when what a base key covers changes
KEYS_DIR = Path(__file__).resolve().parent.parent / "keys"
KEYS_ENV = "KILN_KEYS"  # extra key directories (os.pathsep-separated), searched before kiln/keys


# --------------------------------------------------------------------------------------------------
# resolving: spec + data -> the files to fetch


@dataclass(frozen=True)
class ResolvedKey:
    file: str
    origin: str
    system_paths: tuple[str, ...]


@dataclass(frozen=True)
class ResolvedBase:
    """The concrete files behind a `base:` block."""

    source: str | None
    urls: tuple[str, ...]  # the image, mirrors in order
    filename: str  # its name in the checksum file
    format: BaseFormat
    checksum_urls: tuple[str, ...] = ()
    signature_urls: tuple[str, ...] = ()
    checksum: Digest | None = None  # pinned in the spec: no checksum file needed
    keyring: Path | None = None  # named in the spec
    key: ResolvedKey | None = None  # the upstream's key, looked up by file name
    fingerprints: tuple[str, ...] = ()
    insecure_skip_signature: bool = False
    arch: str = "amd64"  # kiln's name; decides which GPT root type extraction looks for

    @property
    def what(self) -> str:
        return f"{self.source} base image {self.filename}" if self.source else f"base image {self.filename}"


def _render(template: str, values: Mapping[str, str], *, what: str) -> str:
    names = {n for _, n, _, _ in string.Formatter().parse(template) if n}
    missing = sorted(names - set(values))
    if missing:
        raise SpecError(f"{what}: {template!r} needs {', '.join(missing)}, which this base does not define")
    return template.format_map(values)


def _join(directory: str, name: str) -> str:
    return name if URL_RE.match(name) else directory.rstrip("/") + "/" + name


def resolve_base(base: BaseSpec, *, distro: str, release: str, arch: str) -> ResolvedBase:
    """Merge the spec's `base:` block with the upstream data for `distro`/`release`/`arch`."""
    source_name = base.source or (distro if distro in UPSTREAMS else None)
    source = UPSTREAMS.get(source_name) if source_name else None
    key: ResolvedKey | None = None
    pins: tuple[str, ...] = tuple(base.fingerprints)
    values: dict[str, str] = {}
    if source is not None:
        if arch not in source.arches:
            raise SpecError(f"base: {source.title} has no {arch} images (it has {', '.join(source.arches)})")
        version = base.version or source.default_version
        values = {"release": release, "arch": source.arches[arch], "kiln_arch": arch}
        if version is not None:
            values["version"] = version
        values.update(source.release_vars.get(release, {}))
        if source.key is not None:
            key = ResolvedKey(
                file=_render(source.key.file, values, what=f"{source.title} key"),
                origin=_render(source.key.origin, values, what=f"{source.title} key"),
                system_paths=tuple(_render(p, values, what=f"{source.title} key") for p in source.key.system_paths),
            )
            if not pins and base.keyring is None:  # the upstream's pins go with the upstream's key only
                pins = source.key.pins(release)

    if base.url is not None:
        urls = tuple(as_list(base.url))
        filename = url_filename(urls[0])
        fmt = base.format or guess_format(filename)
        assert fmt is not None  # the model's validator checked it
        return ResolvedBase(
            source=source_name, urls=urls, filename=filename, format=fmt,
            checksum_urls=tuple(as_list(base.checksum_url)), signature_urls=tuple(as_list(base.signature_url)),
            checksum=Digest.parse(base.checksum) if base.checksum else None, keyring=base.keyring, key=key,
            fingerprints=pins, insecure_skip_signature=base.insecure_skip_signature, arch=arch,
        )

    if source is None:
        raise SpecError(
            f"base: kiln has no upstream image data for distro {distro!r}; set base.source "
            f"({', '.join(sorted(UPSTREAMS))}) or base.url"
        )
    if source.release_vars and release not in source.release_vars:
        raise SpecError(f"base: kiln does not know {source.title} release {release!r} "
                        f"(it knows {', '.join(source.release_vars)}); set base.url and base.checksum_url")
    if "version" not in values:
        raise SpecError(f"base: {source.title} has no stable 'latest' image name: set base.version. {source.note}")
    template = source.image
    if base.version and source.versioned_image and base.version != source.default_version:
        template = source.versioned_image
    filename = _render(template, values, what=source.title)
    directory = _render(source.directory, values, what=source.title)
    values["image"] = filename
    checksum_urls = tuple(as_list(base.checksum_url)) or (_join(directory, _render(source.checksum, values,
                                                                                     what=source.title)),)
    signature_urls = tuple(as_list(base.signature_url))
    if not signature_urls and source.signing is Signing.detached and source.signature and not base.checksum_url:
        signature_urls = (_join(directory, _render(source.signature, values, what=source.title)),)
    return ResolvedBase(
        source=source_name, urls=(_join(directory, filename),), filename=filename,
        format=base.format or source.format,
        checksum_urls=() if base.checksum else checksum_urls, signature_urls=() if base.checksum else signature_urls,
        checksum=Digest.parse(base.checksum) if base.checksum else None, keyring=base.keyring, key=key,
        fingerprints=pins, insecure_skip_signature=base.insecure_skip_signature, arch=arch,
    )


# --------------------------------------------------------------------------------------------------
# pinning: the verified digest of the image, before its bytes are fetched


@dataclass(frozen=True)
class PinnedBase:
    """A base whose digest is trusted: signed checksum file, a digest in the spec, or an explicit opt-out."""

    base: ResolvedBase
    digest: Digest
    trust: str  # how the digest came to be trusted, for logs and the manifest
    signer: str | None = None  # the primary key fingerprint of a checked signature

    def manifest(self) -> dict[str, Any]:
        return {
            "source": self.base.source,
            "url": self.base.urls[0],
            "filename": self.base.filename,
            "format": self.base.format.value,
            "arch": self.base.arch,
            "digest": str(self.digest),
            "trust": self.trust,
            "signer": self.signer,
            "checksum_url": self.base.checksum_urls[0] if self.base.checksum_urls else None,
        }


def find_keyrings(base: ResolvedBase) -> list[Path]:
    """The keyring that checks `base`'s checksum file: the spec's, else the upstream's key file."""
    if base.keyring is not None:
        if not base.keyring.is_file():
            raise SignatureError(f"{base.what}: keyring {base.keyring} does not exist")
        return [base.keyring]
    if base.key is None:
        raise SignatureError(
            f"{base.what}: no key to check the checksum file's signature: set base.keyring to the public key "
            "that signs it"
        )
    dirs = [Path(d) for d in os.environ.get(KEYS_ENV, "").split(os.pathsep) if d] + [KEYS_DIR]
    candidates = [d / base.key.file for d in dirs] + [Path(p) for p in base.key.system_paths]
    for path in candidates:
        if path.is_file():
            return [path]
    pins = f" (fingerprint {', '.join(base.fingerprints)})" if base.fingerprints else ""
    raise SignatureError(
        f"{base.what}: the signing key is not on this machine. It is {base.key.origin}{pins}. Put it at "
        f"{KEYS_DIR / base.key.file} (or in a directory named by ${KEYS_ENV}), or set base.keyring. Looked in: "
        + ", ".join(str(c) for c in candidates)
    )


def _clearsigned_body(data: bytes) -> bytes:
    """The text of a clearsigned message, without checking it (only for insecure_skip_signature)."""
    lines = data.decode("utf-8", errors="replace").splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines) and lines[i].strip():  # the BEGIN line and the Hash: headers
        i += 1
    for line in lines[i + 1 :]:
        if line.startswith("-----BEGIN PGP SIGNATURE-----"):
            break
        out.append(line[2:] if line.startswith("- ") else line)
    return "\n".join(out).encode()


def pin_base(
    base: ResolvedBase,
    workdir: Path,
    *,
    timeout: float = 30.0,
    retry: RetryPolicy | None = None,
    progress: bool | None = False,
) -> PinnedBase:
    """Fetch and verify the checksum file (and its signature) and return the image's trusted digest.

    Raises VerificationError subclasses (never retry them) when the signature is bad, missing without
    an opt-out, or the file does not list the image; DownloadError when the files cannot be fetched.
    """
    if base.checksum is not None:
        log.info("%s: digest %s pinned in the spec", base.what, base.checksum)
        return PinnedBase(base, base.checksum, trust="digest pinned in the spec")
    if not base.checksum_urls:
        raise SpecError(f"{base.what}: no checksum file and no checksum: nothing to verify the image against")
    workdir.mkdir(parents=True, exist_ok=True)
    sums = workdir / "checksums"
    sig = workdir / "checksums.sig"
    for stale in (sums, sig):  # always fresh: "current" changes, and a half file from a dead run is no help
        for path in (stale, stale.with_name(stale.name + ".partial"), stale.with_name(stale.name + ".partial.json")):
            path.unlink(missing_ok=True)
    download(base.checksum_urls, sums, timeout=timeout, retry=retry, progress=progress,
             what=f"checksum file of {base.what}")
    raw = sums.read_bytes()
    source = base.checksum_urls[0]
    signer: str | None = None
    if base.insecure_skip_signature:
        log.warning("%s: NOT checking the signature of %s (insecure_skip_signature)", base.what, source)
        text = _clearsigned_body(raw) if is_clearsigned(raw) else raw
        trust = "checksum file, signature NOT checked (insecure_skip_signature)"
    elif is_clearsigned(raw) or base.signature_urls:
        detached: Path | None = None
        if base.signature_urls and not is_clearsigned(raw):
            download(base.signature_urls, sig, timeout=timeout, retry=retry, progress=progress,
                     what=f"checksum signature of {base.what}")
            detached = sig
        check = verify_signature(sums, signature=detached, keyrings=find_keyrings(base),
                                 fingerprints=base.fingerprints, workdir=workdir, what=f"checksum file {source}")
        text = check.signed
        signer = check.primary
        trust = f"checksum file {check.kind}-signed by {check.primary}"
    else:
        raise UnsignedChecksumError(
            f"{base.what}: the checksum file {source} is not signed (not clearsigned, and no signature_url). "
            "kiln does not trust an unsigned checksum file: pin the image's digest in the spec "
            "(base.checksum: sha256:…), give base.signature_url and base.keyring, or accept the risk "
            "with base.insecure_skip_signature: true"
        )
    sums_file = parse_checksum_file(text.decode("utf-8", errors="replace"), source=source)
    digest = sums_file.lookup(base.filename)
    log.info("%s: expecting %s (%s)", base.what, digest, trust)
    return PinnedBase(base, digest, trust=trust, signer=signer)


def image_path(pinned: PinnedBase, downloads: Path) -> Path:
    """Where the verified image lives in a download cache: named by its digest, so never stale."""
    d = pinned.digest
    return downloads / f"{d.algorithm}-{d.hexdigest[:32]}" / pinned.base.filename


def fetch_image(
    pinned: PinnedBase,
    downloads: Path,
    *,
    timeout: float = 30.0,
    retry: RetryPolicy | None = None,
    progress: bool | None = None,
) -> DownloadResult:
    """Download the image into `downloads` (reused when already there) and verify it against the pin.

    ChecksumMismatchError leaves neither the file nor its partial download behind.
    """
    dest = image_path(pinned, downloads)
    return download(pinned.base.urls, dest, expected=pinned.digest, timeout=timeout, retry=retry,
                    progress=progress, what=pinned.base.what)


def base_key_fields(pinned: PinnedBase) -> dict[str, object]:
    """The cache key of an upstream base tree: the verified digest and how it is unpacked.

    Not the URL: the same bytes from another mirror are the same base, and a new image behind the
    same "current" URL is a different one.
    """
    return {
        "stage": "upstream-base",
        "version": UPSTREAM_VERSION,
        "extract": EXTRACT_VERSION,
        "digest": str(pinned.digest),
        "format": pinned.base.format.value,
        "arch": pinned.base.arch,
    }
