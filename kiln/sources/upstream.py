"""Upstream cloud images as a base: where each distribution publishes them, and the spec's `base:` block.

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
import posixpath
import re
import string
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kiln.model.errors import SpecError
from kiln.sources.download import DownloadResult, RetryPolicy, download
from kiln.sources.extract import EXTRACT_VERSION, BaseFormat, guess_format
from kiln.sources.verify import (
    Digest,
    SignatureError,
    UnsignedChecksumError,
    is_clearsigned,
    normalize_fingerprint,
    parse_checksum_file,
    verify_signature,
)

log = logging.getLogger("kiln.upstream")

UPSTREAM_VERSION = "1"  # bump when what a base key covers changes
KEYS_DIR = Path(__file__).resolve().parent.parent / "keys"
KEYS_ENV = "KILN_KEYS"  # extra key directories (os.pathsep-separated), searched before kiln/keys


class Signing(StrEnum):
    """How an upstream signs its checksum file."""

    detached = "detached"  # a signature file beside it (SHA256SUMS.gpg, CHECKSUM.asc)
    clearsigned = "clearsigned"  # the checksum file is itself a signed message
    unsigned = "unsigned"  # no signature: the spec must pin `checksum:` or opt out


@dataclass(frozen=True)
class UpstreamKey:
    """The key that signs an upstream's checksum files, and where kiln looks for it."""

    file: str  # file name under kiln/keys/ (or a KILN_KEYS directory); may use {release}
    origin: str  # where the key is published, for the message when it is missing
    fingerprints: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # release (or "*") -> pins
    system_paths: tuple[str, ...] = ()  # where distribution packages install it; may use {release}

    def pins(self, release: str) -> tuple[str, ...]:
        return self.fingerprints.get(release, self.fingerprints.get("*", ()))


@dataclass(frozen=True)
class UpstreamSource:
    """Where one distribution publishes cloud images: templates over {release} {version} {arch} + `release_vars`."""

    name: str
    title: str
    directory: str  # URL of the directory holding image and checksum file
    image: str  # the image's file name
    format: BaseFormat
    checksum: str  # the checksum file's name (or a URL)
    signing: Signing
    signature: str | None = None  # the detached signature's name (Signing.detached)
    key: UpstreamKey | None = None
    arches: Mapping[str, str] = field(default_factory=lambda: {"amd64": "x86_64", "arm64": "aarch64"})
    default_version: str | None = None  # None: the spec must name one (upstream has no stable "latest")
    versioned_image: str | None = None  # the image's name when {version} is not the default
    release_vars: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    note: str = ""


UPSTREAMS: dict[str, UpstreamSource] = {
    s.name: s
    for s in (
        UpstreamSource(
            name="ubuntu",
            title="Ubuntu cloud images",
            directory="https://cloud-images.ubuntu.com/{release}/{version}",
            image="{release}-server-cloudimg-{arch}.img",  # a qcow2 despite the name
            format=BaseFormat.qcow2,
            checksum="SHA256SUMS",
            signing=Signing.detached,
            signature="SHA256SUMS.gpg",
            key=UpstreamKey(
                file="ubuntu-cloudimage-keyring.gpg",
                origin="Ubuntu's 'UEC Image Automatic Signing Key <cdimage@ubuntu.com>' (the ubuntu-keyring "
                "package installs it as /usr/share/keyrings/ubuntu-cloudimage-keyring.gpg)",
                fingerprints={"*": ("D2EB44626FDDC30B513D5BB71A5D6C4C7DB87C81",)},
                system_paths=("/usr/share/keyrings/ubuntu-cloudimage-keyring.gpg",),
            ),
            arches={"amd64": "amd64", "arm64": "arm64"},
            default_version="current",  # or a serial directory such as 20240423
            note="The same directory has {release}-server-cloudimg-{arch}.squashfs, a root tree without a kernel "
            "(what DIB's ubuntu element uses): set base.url to it for a smaller download.",
        ),
        UpstreamSource(
            name="debian",
            title="Debian cloud images",
            directory="https://cloud.debian.org/images/cloud/{release}/{version}",
            image="debian-{number}-genericcloud-{arch}.qcow2",
            versioned_image="debian-{number}-genericcloud-{arch}-{version}.qcow2",
            format=BaseFormat.qcow2,
            checksum="SHA512SUMS",
            signing=Signing.unsigned,
            arches={"amd64": "amd64", "arm64": "arm64"},
            default_version="latest",  # or a build directory such as 20250210-2019
            release_vars={"bullseye": {"number": "11"}, "bookworm": {"number": "12"}, "trixie": {"number": "13"}},
            note="Debian publishes SHA512SUMS for its cloud images without a signature: pin base.checksum "
            "(or opt out with insecure_skip_signature). kiln's default Debian base is mmdebstrap, whose "
            "Release files apt verifies against debian-archive-keyring.",
        ),
        UpstreamSource(
            name="fedora",
            title="Fedora Cloud Base",
            directory="https://download.fedoraproject.org/pub/fedora/linux/releases/{release}/Cloud/{arch}/images",
            image="Fedora-Cloud-Base-Generic-{release}-{version}.{arch}.qcow2",
            format=BaseFormat.qcow2,
            checksum="Fedora-Cloud-{release}-{version}-{arch}-CHECKSUM",
            signing=Signing.clearsigned,
            key=UpstreamKey(
                file="fedora.gpg",
                origin="Fedora's security page (fedora.gpg holds the keys of the current releases; each release "
                "signs with its own key)",
                system_paths=("/etc/pki/rpm-gpg/RPM-GPG-KEY-fedora-{release}-primary",),
            ),
            default_version=None,  # the compose, e.g. 1.4: Fedora has no stable "latest" name
            note="base.version is the compose of the release (the part after the release number in the image "
            "name, e.g. 1.4 for Fedora-Cloud-Base-Generic-41-1.4.x86_64.qcow2). The root is btrfs (subvolumes "
            "root and home) with a separate ext4 /boot; kiln extracts all of them.",
        ),
        UpstreamSource(
            name="centos",
            title="CentOS Stream GenericCloud",
            directory="https://cloud.centos.org/centos/{release}-stream/{arch}/images",
            image="CentOS-Stream-GenericCloud-{release}-{version}.{arch}.qcow2",
            format=BaseFormat.qcow2,
            checksum="{image}.SHA256SUM",
            signing=Signing.unsigned,
            default_version="latest",  # or a build such as 20250331.0
            note="CentOS Stream publishes unsigned per-image .SHA256SUM files: pin base.checksum or opt out.",
        ),
        UpstreamSource(
            name="rocky",
            title="Rocky Linux GenericCloud",
            directory="https://dl.rockylinux.org/pub/rocky/{release}/images/{arch}",
            image="Rocky-{release}-GenericCloud-Base.latest.{arch}.qcow2",
            versioned_image="Rocky-{release}-GenericCloud-Base-{version}.{arch}.qcow2",
            format=BaseFormat.qcow2,
            checksum="{image}.CHECKSUM",
            signing=Signing.unsigned,
            default_version="latest",  # or a build such as 9.6-20250531.0
            note="Rocky Linux 9's checksum files on the mirrors are unsigned (Rocky publishes signed copies in "
            "its checksums repository): pin base.checksum or give signature_url and keyring. Use a -Base image: "
            "the -LVM ones need device-mapper.",
        ),
        UpstreamSource(
            name="almalinux",
            title="AlmaLinux GenericCloud",
            directory="https://repo.almalinux.org/almalinux/{release}/cloud/{arch}/images",
            image="AlmaLinux-{release}-GenericCloud-{version}.{arch}.qcow2",
            format=BaseFormat.qcow2,
            checksum="CHECKSUM",
            signing=Signing.detached,
            signature="CHECKSUM.asc",
            key=UpstreamKey(
                file="RPM-GPG-KEY-AlmaLinux-{release}",
                origin="AlmaLinux's RPM-GPG-KEY-AlmaLinux-{release} (installed by almalinux-release in AlmaLinux)",
                fingerprints={
                    "8": ("5E9B8F5617B5066CE92057C3488FCF7C3ABB34F8",),
                    "9": ("BF18AC2876178908D6E71267D36CB86CB86B3716",),
                },
                system_paths=("/etc/pki/rpm-gpg/RPM-GPG-KEY-AlmaLinux-{release}",),
            ),
            default_version="latest",  # or a build such as 9.6-20250522
        ),
    )
}


# --------------------------------------------------------------------------------------------------
# the spec's base: block


_URL = re.compile(r"^(https?|file)://\S+$")


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


class BaseSpec(BaseModel):
    """`base:` in an image spec: start from an upstream image instead of bootstrapping.

    `base: {}` takes the distribution's published cloud image (see `UPSTREAMS`); `url` names any
    other image (several URLs are mirrors of one file, tried in order). The image's digest comes from
    `checksum_url` (a checksum file, GNU or BSD format, whose GPG signature is checked: clearsigned, or
    detached at `signature_url`) or from `checksum` itself.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str | None = Field(default=None, description="an upstream from kiln.upstream.UPSTREAMS; default: the "
                               "spec's distro")
    version: str | None = Field(default=None, description="the upstream's version/serial directory (default: "
                                "its latest, where it has a stable name)")
    url: str | list[str] | None = Field(default=None, description="the image, or mirror URLs of it")
    checksum_url: str | list[str] | None = Field(default=None, description="the checksum file (or mirrors)")
    signature_url: str | list[str] | None = Field(default=None, description="the checksum file's detached "
                                                  "signature (or mirrors); not needed when it is clearsigned")
    keyring: Path | None = Field(default=None, description="public key file (binary or armored) that signs the "
                                 "checksum file; default: the upstream's key shipped with kiln or installed")
    fingerprints: list[str] = Field(default_factory=list, description="accept only signatures by these keys")
    format: BaseFormat | None = Field(default=None, description="tar, squashfs, qcow2 or raw; default: guessed "
                                      "from the image's name and checked against its content")
    checksum: str | None = Field(default=None, description="sha256:HEX or sha512:HEX: the image's digest, "
                                 "instead of a checksum file")
    insecure_skip_signature: bool = Field(default=False, description="accept a checksum file without checking "
                                          "its signature")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str | None) -> str | None:
        if v is not None and v not in UPSTREAMS:
            raise ValueError(f"unknown upstream {v!r}; kiln knows {', '.join(sorted(UPSTREAMS))}")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", v):
            raise ValueError(f"version {v!r} may only contain letters, digits, '.', '_', '+', '-'")
        return v

    @field_validator("url", "checksum_url", "signature_url")
    @classmethod
    def _urls(cls, v: str | list[str] | None) -> str | list[str] | None:
        urls = _as_list(v)
        if v is not None and not urls:
            raise ValueError("an empty list of URLs")
        for u in urls:
            if not _URL.match(u):
                raise ValueError(f"{u!r} is not an http(s):// or file:// URL")
        return v

    @field_validator("checksum")
    @classmethod
    def _checksum(cls, v: str | None) -> str | None:
        if v is None:
            return v
        return str(Digest.parse(v))

    @field_validator("fingerprints")
    @classmethod
    def _fingerprints(cls, v: list[str]) -> list[str]:
        return [normalize_fingerprint(f) for f in v]

    @model_validator(mode="after")
    def _consistent(self) -> BaseSpec:
        if self.checksum and (self.checksum_url or self.signature_url):
            raise ValueError("give either checksum (the digest itself) or checksum_url/signature_url, not both")
        if self.url is not None and not self.checksum and not self.checksum_url:
            raise ValueError("an image url needs checksum_url (a checksum file) or checksum (sha256:HEX)")
        if self.url is not None and self.format is None:
            name = _filename(_as_list(self.url)[0])
            if guess_format(name) is None:
                raise ValueError(f"cannot tell the format of {name!r} from its name: set format "
                                 f"({', '.join(f.value for f in BaseFormat)})")
        if self.signature_url and self.insecure_skip_signature:
            raise ValueError("signature_url and insecure_skip_signature contradict each other")
        return self


def _filename(url: str) -> str:
    return posixpath.basename(urllib.parse.unquote(urllib.parse.urlsplit(url).path))


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
    return name if _URL.match(name) else directory.rstrip("/") + "/" + name


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
        urls = tuple(_as_list(base.url))
        filename = _filename(urls[0])
        fmt = base.format or guess_format(filename)
        assert fmt is not None  # the model's validator checked it
        return ResolvedBase(
            source=source_name, urls=urls, filename=filename, format=fmt,
            checksum_urls=tuple(_as_list(base.checksum_url)), signature_urls=tuple(_as_list(base.signature_url)),
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
    checksum_urls = tuple(_as_list(base.checksum_url)) or (_join(directory, _render(source.checksum, values,
                                                                                     what=source.title)),)
    signature_urls = tuple(_as_list(base.signature_url))
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
