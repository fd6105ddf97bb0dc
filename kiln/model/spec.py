"""The ImageSpec: what to build, from a YAML file, command-line flags or the Prefect UI form."""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from kiln.model.base import BaseSpec
from kiln.model.checks import CHECK_NAME_RE
from kiln.model.errors import SpecError
from kiln.model.facts import BOOTSTRAPPED, check_suites
from kiln.model.names import check_name
from kiln.model.publishing import PublishSpec

SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


class Distro(StrEnum):
    debian = "debian"
    ubuntu = "ubuntu"
    fedora = "fedora"
    centos = "centos"
    rocky = "rocky"
    almalinux = "almalinux"


class Arch(StrEnum):
    amd64 = "amd64"
    arm64 = "arm64"


class ImageFormat(StrEnum):
    qcow2 = "qcow2"
    raw = "raw"
    vmdk = "vmdk"
    vdi = "vdi"
    vhd = "vhd"
    vhdx = "vhdx"


# variables a spec's env, secrets or secret_blocks may not set: kiln's own for the hooks, and those that change
# which programs run or what they load (a hook outside the chroot runs as root on the host)
RESERVED_ENV = frozenset({
    "PATH", "HOME", "SHELL", "ENV", "BASH_ENV", "IFS", "CDPATH", "GLOBIGNORE", "PS4", "SHELLOPTS", "BASHOPTS",
    "TMPDIR", "TMP_DIR", "TARGET_ROOT", "TMP_MOUNT_PATH", "TMP_HOOKS_PATH", "_LIB",
    "DIB_ENV", "DIB_ARGS", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PERL5LIB", "PERL5OPT", "PERLLIB",
    "RUBYOPT", "RUBYLIB", "NODE_OPTIONS", "GCONV_PATH", "LOCPATH", "HOSTALIASES", "RESOLV_HOST_CONF",
    "KILN_APT_SOURCES", "KILN_APT_SOURCES_NAME", "KILN_PACKAGE_FAMILY", "KILN_SSH_PASSWORD", "SOURCE_DATE_EPOCH",
})
RESERVED_ENV_PREFIXES = ("LD_", "BASH_FUNC_", "MALLOC_", "GLIBC_")


class Compression(StrEnum):
    """How a qcow2 image's clusters are compressed (`qemu-img convert -c -o compression_type=`)."""

    zstd = "zstd"
    zlib = "zlib"
    none = "none"


class Firmware(StrEnum):
    bios = "bios"
    uefi = "uefi"
    uefi_secureboot = "uefi-secureboot"  # OVMF with Microsoft's keys enrolled, Secure Boot enforced (amd64)


def parse_size(value: str | int) -> int:
    """'8G', '512M', '2.5GiB' or a byte count -> bytes."""
    if isinstance(value, int):
        return value
    m = SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"not a size: {value!r} (use e.g. 4G, 512M)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class BootBackend(StrEnum):
    qemu = "qemu"
    nova = "nova"


class BootTestSpec(StrictModel):
    """How the boot test runs: under kiln's own QEMU during the build, or in a cloud's Nova."""

    enabled: bool = True
    backend: BootBackend = Field(
        default=BootBackend.qemu,
        description="qemu: boot under local QEMU in the build (every firmware); nova: boot in the cloud's Nova "
        "instead, the way the cloud boots its images (the candidate of a glance:CLOUD publish target, or else a "
        "temporary image in boot_test.cloud)",
    )
    cloud: str | None = Field(default=None, description="nova: the clouds.yaml cloud to boot in when the spec "
                                                        "publishes to no Glance target")
    flavor: str | None = Field(default=None, description="nova: flavor name or id (default: the smallest that fits)")
    network: str | None = Field(default=None, description="nova: none, auto, or a network name or id (default: "
                                                          "none, or the cloud's kiln.boot_network)")
    # plain defaults (pydantic copies them), so the Prefect UI form shows them pre-selected
    firmware: list[Firmware] = Field(default=[Firmware.bios, Firmware.uefi], min_length=1)
    timeout: int = Field(default=900, ge=30, le=7200, description="seconds until cloud-init must have finished")
    memory: int = Field(default=1024, ge=256, le=16384, description="guest memory in MiB")
    cpus: int = Field(default=2, ge=1, le=16)
    root_login: bool = Field(
        default=False,
        description="also set a random root password through user-data (`password:`, which goes to cloud-init's "
        "default user) and log in as root on the serial console; for images with cloud-init-cfg",
    )
    ssh_login: bool = Field(
        default=False,
        description="with root_login: also log in as root over SSH with that password, as an operator would "
        "(the guest's port 22 forwarded from 127.0.0.1; the guest stays off the host's network); needs the "
        "openssh-server element",
    )

    reboot: bool = Field(
        default=True,
        description="reboot the guest once its conformance checks ran and run them again (the second boot must "
        "pass too)",
    )
    waive: dict[str, str] = Field(
        default_factory=dict,
        description="conformance checks this image is meant to fail, each with its reason: still run and "
        "recorded (as waived), they do not fail the build (docs/conformance.md lists the checks)",
    )

    @field_validator("waive")
    @classmethod
    def _waivers(cls, waive: dict[str, str]) -> dict[str, str]:
        for name, reason in waive.items():
            if not CHECK_NAME_RE.fullmatch(name):
                raise ValueError(f"{name!r} is not a check name (a built-in one, or ELEMENT/FILE of an element's "
                                 "checks.d)")
            if not reason.strip():
                raise ValueError(f"the waiver of {name!r} needs a reason")
        return waive

    @model_validator(mode="after")
    def _ssh_needs_root_login(self) -> BootTestSpec:
        if self.ssh_login and not self.root_login:
            raise ValueError("ssh_login needs root_login: true (the password it logs in with is root's)")
        return self


class ImageSpec(StrictModel):
    """One image to build. Unknown fields are errors."""

    name: str = ""
    distro: Distro = Distro.debian
    release: str = "bookworm"
    arch: Arch = Arch.amd64
    elements: list[str] = Field(default_factory=list)
    packages: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict, description="variables passed to every element hook")
    secrets: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="variables passed to every element hook whose values never appear in logs, the Prefect UI, "
        "artifacts, manifests or cache keys (e.g. KILN_ROOT_PASSWORD for the root-password element)",
    )
    secret_blocks: dict[str, str] = Field(
        default_factory=dict,
        description="secrets from Prefect Secret blocks, read by the worker when the build starts: VARIABLE: "
        "block-name (the only way a run started from the UI or the API takes a secret; its parameters are "
        "stored in Prefect's database)",
    )
    size: Annotated[int, WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}],
                                         "title": "Size", "default": "4G"})] = Field(
        default=parse_size("4G"), description="disk size in bytes, or with a unit: 4G, 512M, …")
    formats: list[ImageFormat] = Field(default=[ImageFormat.qcow2], min_length=1)
    compression: Compression = Field(
        default=Compression.zstd, description="qcow2 compression: zstd (QEMU 5.1 and later read it), zlib (every "
        "QEMU reads it; slower to write) or none. `compress: true|false` is read as zstd|none")
    qemu_img_options: str | None = Field(default=None, description="extra `qemu-img convert -o` options")
    mirror: str | None = Field(default=None, description="package mirror; default: the host's apt sources "
                               "(Debian only: an Ubuntu spec names its mirror)")
    security_mirror: str | None = Field(default=None, description="mirror of the -security suite; default: "
                                        "DIB_DEBIAN_SECURITY_MIRROR, else the host's apt sources' security entry "
                                        "(Ubuntu: the mirror)")
    suites: list[str] | None = Field(default=None, description="suites to build from, the release first; default: "
                                     "the release, -updates and -security (opting out is recorded in the manifest)")
    image_mirror: str | None = Field(default=None, description="mirror the image's own apt sources name; default: "
                                     "the build's mirror")
    image_security_mirror: str | None = Field(default=None, description="security mirror the image's apt sources "
                                              "name; default: the build's security mirror")
    mirror_keyring: Path | None = Field(default=None, description="keyring that signs the mirror's Release files; "
                                        "default: the host's apt keyrings (Ubuntu: ubuntu-archive-keyring.gpg)")
    base: BaseSpec | None = Field(default=None, description="start from an upstream cloud image (verified) instead "
                                                           "of bootstrapping; see docs/upstream-images.md")
    boot_test: BootTestSpec = Field(default_factory=BootTestSpec)
    publish: PublishSpec = Field(default_factory=PublishSpec, description="where and how the build is published")

    @model_validator(mode="before")
    @classmethod
    def _compress_is_compression(cls, data: Any) -> Any:
        """`compress: true|false` (kiln before 0.2, and DIB's habit of a yes/no) is `compression: zstd|none`."""
        if isinstance(data, dict) and "compress" in data:
            data = dict(data)
            value = data.pop("compress")
            if not isinstance(value, bool):
                raise ValueError(f"compress: {value!r} is not true or false (or use compression: zstd|zlib|none)")
            # with both (a spec's old compress and the command line's --compression), compression wins
            data.setdefault("compression", Compression.zstd if value else Compression.none)
        return data

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        size = parse_size(v)
        if size < parse_size("256M"):
            raise ValueError(f"{size} bytes is too small for a bootable image (the pack stage checks the "
                             "real need; nothing boots below 256M)")
        return size

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "image name") if v else v

    @field_validator("release")
    @classmethod
    def _release(cls, v: str) -> str:
        return check_name(v, "release")

    @field_validator("elements")
    @classmethod
    def _elements(cls, v: list[str]) -> list[str]:
        out: list[str] = []
        for name in v:
            check_name(name, "element name")
            if name not in out:
                out.append(name)
        return out

    @field_validator("packages")
    @classmethod
    def _packages(cls, v: list[str]) -> list[str]:
        for name in v:
            if not re.match(r"^[a-z0-9][a-z0-9+.:~=-]*$", name):
                raise ValueError(f"package name {name!r} is not a valid package name")
        return sorted(set(v))

    @field_validator("env", "secrets", "secret_blocks")
    @classmethod
    def _env(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        for key, value in v.items():
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise ValueError(f"environment variable name {key!r} is not valid")
            if key in RESERVED_ENV or key.startswith(RESERVED_ENV_PREFIXES):
                raise ValueError(f"{key}: kiln sets this variable for the hooks (or it changes what programs run "
                                 "and load); a spec may not")
            # a Prefect block name: lowercase letters, digits and dashes
            if info.field_name == "secret_blocks" and not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,127}", value):
                raise ValueError(f"{key}: {value!r} is not a Prefect block name (lowercase letters, digits, dashes)")
        return v

    @field_validator("qemu_img_options")
    @classmethod
    def _qemu_img_options(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[A-Za-z0-9_.=,-]+$", v):
            raise ValueError(f"{v!r} is not a qemu-img option list (name=value,name=value)")
        return v

    @field_validator("mirror", "security_mirror", "image_mirror", "image_security_mirror")
    @classmethod
    def _mirror(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(https?|file)://\S+$", v):
            raise ValueError(f"mirror {v!r} must be an http(s):// or file:// URL")
        return v.rstrip("/") if v else v

    @field_validator("suites")
    @classmethod
    def _suites(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if v is None:
            return v
        for name in v:
            check_name(name, "suite")
        try:
            return check_suites(str(info.data.get("release", "")), v)
        except SpecError as exc:
            raise ValueError(str(exc).removeprefix("suites: ")) from None

    @model_validator(mode="after")
    def _default_name(self) -> ImageSpec:
        if not self.name:
            object.__setattr__(self, "name", f"{self.distro.value}-{self.release}-{self.arch.value}")
        return self

    @model_validator(mode="after")
    def _base_for_distros_kiln_cannot_bootstrap(self) -> ImageSpec:
        if self.distro.value not in BOOTSTRAPPED and self.base is None:
            raise ValueError(f"distro {self.distro.value}: kiln bootstraps only "
                             f"{' and '.join(sorted(BOOTSTRAPPED))}; start from the distro's cloud "
                             f"image with a base: block (base: {{source: {self.distro.value}}} or base.url)")
        return self

    @model_validator(mode="after")
    def _nova_needs_a_cloud(self) -> ImageSpec:
        bt = self.boot_test
        if bt.enabled and bt.backend == BootBackend.nova and not bt.cloud and not self.publish.glance_clouds:
            raise ValueError("boot_test.backend nova needs a cloud to boot in: set boot_test.cloud, or publish "
                             "to a glance:CLOUD target (its candidate is booted before promotion)")
        return self


def _format_errors(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        msg = msg.removeprefix("Value error, ")
        parts.append(f"{source}: field '{loc}': {msg}")
    return "\n".join(parts)


def spec_from_dict(data: dict[str, Any], source: str) -> ImageSpec:
    try:
        return ImageSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_format_errors(exc, source)) from None


def read_spec_file(path: Path) -> dict[str, Any]:
    """The raw mapping of a spec file; YAML errors name the file and line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{path}{where}: malformed YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a spec must be a mapping of fields, not {type(data).__name__}")
    return data


def load_spec(path: Path, overrides: dict[str, Any] | None = None) -> ImageSpec:
    """Load a spec file, apply command-line overrides (see `merge_overrides`), validate."""
    data = read_spec_file(path)
    if "axes" in data and ("cell_name" in data or (isinstance(data.get("base"), dict) and "distro" in data["base"])):
        raise SpecError(f"{path}: this is a matrix file (it has axes: {', '.join(map(str, data['axes'] or {}))}), "
                        f"not an image spec: build it with `kiln matrix {path}` (one cell: --only "
                        "release=…,arch=…)")
    if overrides:
        data = merge_overrides(data, overrides)
    base = data.get("base")
    if isinstance(base, dict) and isinstance(base.get("keyring"), str):
        # a keyring named in a spec file is relative to that file
        base["keyring"] = str((path.parent / base["keyring"]).resolve())
    return spec_from_dict(data, str(path))


def merge_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Flags on top of a spec: list fields named `add_<field>` are appended, others replace."""
    merged = dict(data)
    for key, value in overrides.items():
        if value is None:
            continue
        if key.startswith("add_"):
            field = key.removeprefix("add_")
            current = list(merged.get(field) or [])
            merged[field] = current + [v for v in value if v not in current]
        elif key in ("env", "secrets", "secret_blocks"):
            merged[key] = {**(merged.get(key) or {}), **value}
        elif key == "boot_test":
            merged["boot_test"] = {**(merged.get("boot_test") or {}), **value}
        else:
            merged[key] = value
    return merged
