"""Where an image starts: the spec's `base:` block, and the catalog of where each distribution publishes its
cloud images (`UPSTREAMS`). Data and checks only: fetching, verifying and extracting are kiln.sources'.
"""

from __future__ import annotations

import posixpath
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ALGORITHMS: dict[str, int] = {"sha512": 128, "sha256": 64}


class BaseFormat(StrEnum):
    tar = "tar"
    squashfs = "squashfs"
    qcow2 = "qcow2"
    raw = "raw"


_NAME_FORMATS: tuple[tuple[str, BaseFormat], ...] = (
    (".tar", BaseFormat.tar),
    (".tar.gz", BaseFormat.tar),
    (".tgz", BaseFormat.tar),
    (".tar.xz", BaseFormat.tar),
    (".txz", BaseFormat.tar),
    (".tar.zst", BaseFormat.tar),
    (".tar.zstd", BaseFormat.tar),
    (".tzst", BaseFormat.tar),
    (".tar.bz2", BaseFormat.tar),
    (".squashfs", BaseFormat.squashfs),
    (".sqfs", BaseFormat.squashfs),
    (".qcow2", BaseFormat.qcow2),
    (".qcow2.xz", BaseFormat.qcow2),
    (".qcow2.gz", BaseFormat.qcow2),
    (".qcow2.zst", BaseFormat.qcow2),
    (".img", BaseFormat.qcow2),  # Ubuntu's cloud .img files are qcow2; a raw .img is recognised by content
    (".raw", BaseFormat.raw),
    (".raw.xz", BaseFormat.raw),
    (".raw.gz", BaseFormat.raw),
    (".raw.zst", BaseFormat.raw),
)


def guess_format(name: str) -> BaseFormat | None:
    """The format a file name suggests (`…-root.tar.xz` -> tar), or None."""
    lower = name.lower().split("?", 1)[0]
    best: tuple[int, BaseFormat] | None = None
    for suffix, fmt in _NAME_FORMATS:
        if lower.endswith(suffix) and (best is None or len(suffix) > best[0]):
            best = (len(suffix), fmt)
    return best[1] if best else None


@dataclass(frozen=True)
class Digest:
    """A digest as `algorithm:hex`, e.g. `sha256:9f86d0…`."""

    algorithm: str
    hexdigest: str

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unsupported digest algorithm {self.algorithm!r} (kiln checks {', '.join(ALGORITHMS)})")
        if not re.fullmatch(rf"[0-9a-f]{{{ALGORITHMS[self.algorithm]}}}", self.hexdigest):
            raise ValueError(
                f"{self.algorithm} digest {self.hexdigest!r} is not {ALGORITHMS[self.algorithm]} lowercase hex digits"
            )

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hexdigest}"

    @classmethod
    def parse(cls, value: str) -> Digest:
        """`sha256:HEX` or `sha512:HEX` (case-insensitive hex) -> Digest; ValueError otherwise."""
        algorithm, sep, hexdigest = value.strip().partition(":")
        if not sep:
            raise ValueError(f"checksum {value!r} must be written as sha256:HEX or sha512:HEX")
        return cls(algorithm.lower().replace("-", ""), hexdigest.lower())


def normalize_fingerprint(fpr: str) -> str:
    clean = re.sub(r"\s+", "", fpr).upper()
    if not re.fullmatch(r"[0-9A-F]{40}|[0-9A-F]{64}", clean):
        raise ValueError(f"{fpr!r} is not a full OpenPGP fingerprint (40 or 64 hex digits)")
    return clean



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


URL_RE = re.compile(r"^(https?|file)://\S+$")


def as_list(value: str | list[str] | None) -> list[str]:
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

    source: str | None = Field(default=None, description="an upstream from kiln.model.base.UPSTREAMS; default: the "
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
        urls = as_list(v)
        if v is not None and not urls:
            raise ValueError("an empty list of URLs")
        for u in urls:
            if not URL_RE.match(u):
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
            name = url_filename(as_list(self.url)[0])
            if guess_format(name) is None:
                raise ValueError(f"cannot tell the format of {name!r} from its name: set format "
                                 f"({', '.join(f.value for f in BaseFormat)})")
        if self.signature_url and self.insecure_skip_signature:
            raise ValueError("signature_url and insecure_skip_signature contradict each other")
        return self


def url_filename(url: str) -> str:
    return posixpath.basename(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
