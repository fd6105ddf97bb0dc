"""The Glance properties of a published image: the ones Nova and users read, and kiln's own
(provenance and state)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

from kiln.model import facts
from kiln.model.names import is_plain_name
from kiln.model.pkgdiff import content_digest
from kiln.model.publishing import PublishSpec
from kiln.model.record import BuildRecord, ImageRecord

GiB = 1 << 30

# kiln's own Glance properties
P_NAME = "kiln_name"
P_STATUS = "kiln_status"
P_BUILD_ID = "kiln_build_id"
P_CREATED = "kiln_created"
P_SHA256 = "kiln_sha256"
P_SPEC = "kiln_spec_sha256"
P_ELEMENTS = "kiln_elements_sha256"
P_ELEMENT = "kiln_element_"
P_BASE = "kiln_base_checksum"
P_VERSION = "kiln_version"
P_CONTENT = "kiln_content_sha256"  # packages, elements and spec: equal for a rebuild that changed nothing
# the build's SBOMs and SHA256SUMS's signature: where they were published (S3), else their file names
P_SBOM_SPDX = "kiln_sbom_spdx"
P_SBOM_CYCLONEDX = "kiln_sbom_cyclonedx"
P_SUMS_SIGNATURE = "kiln_sha256sums_signature"
P_SIGNING_KEY = "kiln_signing_key"  # the signer's primary key fingerprint


def canonical_sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _element_key(name: str) -> str:
    return P_ELEMENT + re.sub(r"[^A-Za-z0-9_-]", "_", name)


def uefi_only(build: BuildRecord) -> bool:
    """Whether the image boots only under UEFI: the disk's recorded firmware, else its architecture's."""
    if build.disk.firmware:
        return set(build.disk.firmware) == {"uefi"}
    return facts.uefi_only(build.arch)


def min_disk_gib(build: BuildRecord) -> int:
    size = build.disk.size or build.spec.get("size") or 0
    return math.ceil(int(size) / GiB)


def min_ram_mib(build: BuildRecord, spec: PublishSpec) -> int:
    if spec.min_ram is not None:
        return spec.min_ram
    return int(build.boot_settings.get("memory") or 0)


def glance_properties(build: BuildRecord, image: ImageRecord, spec: PublishSpec, *, name: str) -> dict[str, str]:
    """The properties a published image carries: the ones Nova and users read, then kiln's own
    (provenance and state), then the spec's `properties`, which win over kiln's defaults."""
    s = build.spec
    distro, release = str(s.get("distro", "")), str(s.get("release", ""))
    elements = {e.name: e.sha256 for e in build.elements}
    props: dict[str, str] = {
        "os_type": "linux",
        "os_distro": distro,
        "os_version": facts.os_version(distro, release),
        "architecture": facts.machine_of(build.arch),
        "hw_disk_bus": "virtio",
        "hw_qemu_guest_agent": "yes" if "qemu-guest-agent" in elements else "no",
    }
    if uefi_only(build):
        props["hw_firmware_type"] = "uefi"
    if facts.SECURE_BOOT in build.disk.firmware:
        # its ESP boots the distribution's signed chain: Nova may enforce Secure Boot where it boots it with
        # UEFI (hw_firmware_type=uefi, os_secure_boot=required in publish.properties make that a must)
        props["os_secure_boot"] = "optional"
    base = build.base
    props.update({
        P_NAME: name,
        P_BUILD_ID: build.build_id,
        P_CREATED: build.created,
        P_SHA256: image.sha256,
        P_SPEC: canonical_sha256({k: v for k, v in s.items() if k != "publish"}),  # what was built, not where to
        P_ELEMENTS: canonical_sha256(sorted(elements.items())),
        P_BASE: str(base.get("sha256") or base.get("checksum") or base.get("key") or ""),
        P_VERSION: build.kiln_version,
        P_CONTENT: content_digest(build.manifest()),
    })
    props.update(attestation_properties(build, spec, name=name))
    for element, digest in sorted(elements.items()):
        props[_element_key(element)] = digest
    props.update(spec.properties)
    return {k: v for k, v in props.items() if v != ""}


def attestation_properties(build: BuildRecord, spec: PublishSpec, *, name: str) -> dict[str, str]:
    """Where the build's SBOMs and SHA256SUMS's signature are: in the first S3 location the spec publishes to
    (beside the image: s3://BUCKET/PREFIX/NAME/BUILD_ID/FILE), else by file name (beside the image in the
    build's output); and the signing key's fingerprint."""
    locations = spec.s3_locations

    def where(file: str) -> str:
        if not is_plain_name(file):
            return ""
        if not locations:
            return file
        url = f"s3://{locations[0].bucket}/{locations[0].key(name, build.build_id, file)}"
        return url if len(url) <= 255 else file

    props: dict[str, str] = {}
    for sbom in build.sboms:
        key = P_SBOM_SPDX if sbom.format.startswith("spdx") else \
            P_SBOM_CYCLONEDX if sbom.format.startswith("cyclonedx") else None
        if key:
            props[key] = where(sbom.file)
    if build.signature is not None:
        props[P_SUMS_SIGNATURE] = where(build.signature.file)
        props[P_SIGNING_KEY] = build.signature.fingerprint if re.fullmatch(r"[0-9A-F]{40,64}",
                                                                           build.signature.fingerprint) else ""
    return props
