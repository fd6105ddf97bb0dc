"""The SBOMs beside every image: SPDX 2.3 JSON and CycloneDX 1.6 JSON, each listing every installed package
(name, version, architecture, purl, the licence it declares), written and checked with the formats' own
libraries (spdx-tools, cyclonedx-python-lib) and their validators.

Deterministic: packages sorted; the SPDX document namespace and the CycloneDX serial number derived from the
build id and the image's sha256; the creation time is the build record's `created`.

Licences: a package's declared licence (the `license` of the manifest's package entry, from its DEP-5
copyright file or its RPM header) is used as an SPDX expression where it is one; Debian's short names
(GPL-2+, Expat, BSD-3-clause, …) are mapped to SPDX identifiers; anything else becomes a `LicenseRef-…` with
the declared name as its extracted licensing info (SPDX), or a licence by name (CycloneDX). A package that
declares none has NOASSERTION (SPDX) and no licence (CycloneDX).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import uuid
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cyclonedx.model import Property
from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.model.license import DisjunctiveLicense, LicenseExpression
from cyclonedx.output.json import JsonV1Dot6
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
from packageurl import PackageURL
from spdx_tools.common.spdx_licensing import spdx_licensing  # type: ignore[import-untyped]
from spdx_tools.spdx.model.actor import Actor, ActorType
from spdx_tools.spdx.model.document import CreationInfo, Document
from spdx_tools.spdx.model.extracted_licensing_info import ExtractedLicensingInfo
from spdx_tools.spdx.model.package import ExternalPackageRef, ExternalPackageRefCategory, Package, PackagePurpose
from spdx_tools.spdx.model.relationship import Relationship, RelationshipType
from spdx_tools.spdx.model.spdx_no_assertion import SpdxNoAssertion
from spdx_tools.spdx.parser.jsonlikedict.json_like_dict_parser import JsonLikeDictParser
from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document
from spdx_tools.spdx.writer.json.json_writer import write_document_to_stream

from kiln.host.checksums import write_replacing
from kiln.model import facts
from kiln.model.errors import KilnError
from kiln.model.record import SbomRecord

SPDX_FORMAT = "spdx-2.3"
CYCLONEDX_FORMAT = "cyclonedx-1.6"
SPDX_SUFFIX = ".spdx.json"
CYCLONEDX_SUFFIX = ".cdx.json"
SBOM_SUFFIXES = (SPDX_SUFFIX, CYCLONEDX_SUFFIX)
_NAMESPACE = uuid.UUID("6f1c6b1e-3d0a-4c55-9d6e-6b696c6e5342")  # kiln's, for the documents' uuid5 names
_CYCLONEDX_VERSIONS = {"1.5": SchemaVersion.V1_5, "1.6": SchemaVersion.V1_6, "1.7": SchemaVersion.V1_7}


class SbomError(KilnError):
    """An SBOM could not be made, or one read back is not valid or does not list the build's packages."""


@dataclass(frozen=True, order=True)
class InstalledPackage:
    """One installed package, as the manifest lists it (`license`, `source` and `suite` where known)."""

    name: str
    version: str
    arch: str
    license: str | None = None
    source: str | None = None
    suite: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return self.name, self.version, self.arch


@dataclass(frozen=True)
class ImageFacts:
    """What the SBOMs say about the image they describe."""

    name: str  # the spec's name: the SBOMs' files are NAME.spdx.json and NAME.cdx.json
    distro: str
    release: str
    build_id: str
    created: str  # ISO 8601, the build record's
    image_sha256: str
    kiln_version: str

    @property
    def distro_qualifier(self) -> str:
        """purl's `distro` qualifier: debian-12, ubuntu-24.04, fedora-41."""
        return f"{self.distro}-{facts.os_version(self.distro, self.release)}"


def installed_packages(packages: Iterable[Mapping[str, Any]]) -> list[InstalledPackage]:
    """The manifest's package entries, typed and sorted (a missing `license` or `source` is None)."""
    out = []
    for p in packages:
        def opt(key: str, p: Mapping[str, Any] = p) -> str | None:
            value = p.get(key)
            return str(value) if value not in (None, "") else None
        out.append(InstalledPackage(str(p["name"]), str(p["version"]), str(p.get("arch", "")),
                                    opt("license"), opt("source"), opt("suite")))
    return sorted(out)


def package_url(pkg: InstalledPackage, image: ImageFacts) -> PackageURL:
    """pkg:deb/debian/NAME@VERSION?arch=ARCH&distro=debian-12 (and upstream=SOURCE where it differs); RPM's
    epoch is the `epoch` qualifier, as the purl specification has it."""
    kind, namespace = facts.purl_namespace(image.distro)
    qualifiers = {"distro": image.distro_qualifier}
    if pkg.arch:
        qualifiers["arch"] = pkg.arch
    version = pkg.version
    if kind == "rpm" and ":" in version:
        qualifiers["epoch"], version = version.split(":", 1)
    if pkg.source and pkg.source != pkg.name:
        qualifiers["upstream"] = pkg.source
    return PackageURL(type=kind, namespace=namespace, name=pkg.name, version=version, qualifiers=qualifiers)


def package_of_purl(purl: str) -> tuple[str, str, str]:
    """(name, version, arch) of a purl written by `package_url` (the epoch put back into an RPM version)."""
    parsed = PackageURL.from_string(purl)
    quals = parsed.qualifiers if isinstance(parsed.qualifiers, dict) else {}
    version = parsed.version or ""
    if quals.get("epoch"):
        version = f"{quals['epoch']}:{version}"
    return parsed.name, version, quals.get("arch", "")


# ---------------------------------------------------------------------------------------------------
# licences

# Debian's DEP-5 short names that are not SPDX identifiers (GPL-2+ and its kin are mapped by pattern)
DEP5_NAMES = {"expat": "MIT", "bsd-2-clause": "BSD-2-Clause", "bsd-3-clause": "BSD-3-Clause",
              "bsd-4-clause": "BSD-4-Clause", "apache-2": "Apache-2.0", "apache-2.0": "Apache-2.0",
              "artistic": "Artistic-1.0", "artistic-1": "Artistic-1.0", "artistic-2": "Artistic-2.0",
              "zlib": "Zlib", "isc": "ISC", "cc0": "CC0-1.0", "cc0-1.0": "CC0-1.0", "mpl-2": "MPL-2.0",
              "mpl-1.1": "MPL-1.1", "mpl-2.0": "MPL-2.0", "psf-2": "PSF-2.0", "python-2.0": "Python-2.0",
              "openssl": "OpenSSL", "x11": "X11", "curl": "curl", "bsl-1.0": "BSL-1.0", "unicode-dfs-2016":
              "Unicode-DFS-2016", "lppl-1.3c": "LPPL-1.3c", "ofl-1.1": "OFL-1.1", "sil-ofl-1.1": "OFL-1.1"}
_GNU = re.compile(r"^(A|L)?GPL-?v?(\d)(?:\.(\d))?(\+)?$|^(GFDL)-(\d)\.(\d)(\+)?$", re.IGNORECASE)
_OPERATOR = re.compile(r"\s+(and|or)\s+", re.IGNORECASE)


def _gnu_id(name: str) -> str | None:
    m = _GNU.match(name)
    if not m:
        return None
    if m.group(5):  # GFDL-1.2(+)
        return f"GFDL-{m.group(6)}.{m.group(7)}-{'or-later' if m.group(8) else 'only'}"
    family = (m.group(1) or "").upper() + "GPL"
    version = f"{m.group(2)}.{m.group(3) or '0'}"
    return f"{family}-{version}-{'or-later' if m.group(4) else 'only'}"


def _valid(expression: str) -> bool:
    """Whether `expression` is an SPDX licence expression of known identifiers (never raises)."""
    try:
        return not spdx_licensing.validate(expression).errors
    except Exception:  # license_expression raises on some malformed keys instead of reporting them
        return False


def _spdx_id(name: str) -> str | None:
    """`name` as a known SPDX licence identifier, or None."""
    mapped = DEP5_NAMES.get(name.lower()) or _gnu_id(name)
    if mapped:
        return mapped
    if re.fullmatch(r"[A-Za-z0-9.+-]+", name) and _valid(name):
        return str(spdx_licensing.parse(name))
    return None


class Licences:
    """Declared licences as SPDX expressions, with the `LicenseRef-` ids made for names SPDX does not know
    (one per distinct name, for the document's extracted licensing info)."""

    def __init__(self) -> None:
        self.refs: dict[str, str] = {}  # LicenseRef id -> the declared name

    def _ref(self, name: str) -> str:
        base = "LicenseRef-" + (re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-.") or "unnamed")[:60]
        ref, n = base, 1
        while ref in self.refs and self.refs[ref] != name:
            n += 1
            ref = f"{base}-{n}"
        self.refs[ref] = name
        return ref

    def expression(self, declared: str) -> tuple[str, bool]:
        """(SPDX expression, whether it uses only SPDX's own identifiers)."""
        text = " ".join(declared.split())
        if _valid(text):
            return str(spdx_licensing.parse(text)), True
        parts = _OPERATOR.split(text)
        terms, operators = [t.strip() for t in parts[0::2]], [op.upper() for op in parts[1::2]]
        if all(t and not re.search(r"[(),]", t) for t in terms):
            mapped = [_spdx_id(t) or t for t in terms]
            refs = {m: self._ref(m) for m in mapped if _spdx_id(m) is None}
            words = [x for pair in zip(mapped, [*operators, ""], strict=True) for x in pair if x]
            probe = " ".join("MIT" if w in refs else w for w in words)
            if _valid(probe):
                return " ".join(refs.get(w, w) for w in words), not refs
            for ref in refs.values():
                self.refs.pop(ref, None)
        return self._ref(text), False

    def extracted(self) -> list[ExtractedLicensingInfo]:
        return [ExtractedLicensingInfo(license_id=ref, license_name=name,
                                       extracted_text=f"{name}: the licence as the package declares it (its "
                                       "copyright file or package header), which names no SPDX licence")
                for ref, name in sorted(self.refs.items())]


# ---------------------------------------------------------------------------------------------------
# the documents


def _uuid(kind: str, image: ImageFacts) -> uuid.UUID:
    return uuid.uuid5(_NAMESPACE, f"{kind}:{image.name}:{image.build_id}:{image.image_sha256}")


def _spdx_ref(index: int, name: str) -> str:
    return f"SPDXRef-Package-{index}-{re.sub(r'[^A-Za-z0-9.-]+', '-', name)}"


def spdx_document(packages: list[InstalledPackage], image: ImageFacts) -> Document:
    """The image as an SPDX 2.3 document: the image (an operating system) and every package it contains."""
    info = CreationInfo(
        spdx_version="SPDX-2.3", spdx_id="SPDXRef-DOCUMENT", name=image.name,
        document_namespace=f"https://spdx.org/spdxdocs/{image.name}-{_uuid('spdx', image)}",
        creators=[Actor(ActorType.TOOL, f"kiln-{image.kiln_version}")],
        created=datetime.fromisoformat(image.created),
        creator_comment=f"kiln build {image.build_id}; the installed packages of the image's package database")
    root = Package(spdx_id="SPDXRef-Image", name=image.name, download_location=SpdxNoAssertion(),
                   version=image.build_id, files_analyzed=False,
                   primary_package_purpose=PackagePurpose.OPERATING_SYSTEM,
                   comment=f"{image.distro} {image.release}; image sha256 {image.image_sha256}")
    licences = Licences()
    spdx_packages = [root]
    relationships = [Relationship("SPDXRef-DOCUMENT", RelationshipType.DESCRIBES, "SPDXRef-Image")]
    for index, pkg in enumerate(sorted(packages), 1):
        declared: Any = SpdxNoAssertion()
        if pkg.license:
            declared = spdx_licensing.parse(licences.expression(pkg.license)[0])
        ref = _spdx_ref(index, pkg.name)
        spdx_packages.append(Package(
            spdx_id=ref, name=pkg.name, download_location=SpdxNoAssertion(), version=pkg.version,
            files_analyzed=False, license_concluded=SpdxNoAssertion(), license_declared=declared,
            copyright_text=SpdxNoAssertion(), source_info=f"source package {pkg.source}" if pkg.source else None,
            comment=f"architecture {pkg.arch}" + (f"; from {pkg.suite}" if pkg.suite else ""),
            external_references=[ExternalPackageRef(ExternalPackageRefCategory.PACKAGE_MANAGER, "purl",
                                                    package_url(pkg, image).to_string())]))
        relationships.append(Relationship("SPDXRef-Image", RelationshipType.CONTAINS, ref))
    return Document(info, packages=spdx_packages, relationships=relationships,
                    extracted_licensing_info=licences.extracted())


def cyclonedx_bom(packages: list[InstalledPackage], image: ImageFacts) -> Bom:
    """The image as a CycloneDX BOM: the image (an operating system) depending on every package."""
    root = Component(type=ComponentType.OPERATING_SYSTEM, name=image.name, version=image.build_id,
                     bom_ref=f"image:{image.name}@{image.build_id}",
                     properties=[Property(name="kiln:image-sha256", value=image.image_sha256),
                                 Property(name="kiln:distro", value=f"{image.distro} {image.release}")])
    tool = Component(type=ComponentType.APPLICATION, name="kiln", version=image.kiln_version)
    bom = Bom(serial_number=_uuid("cyclonedx", image),
              metadata=BomMetaData(component=root, timestamp=datetime.fromisoformat(image.created)))
    bom.metadata.tools.components.add(tool)
    licences = Licences()
    components = []
    for pkg in sorted(packages):
        purl = package_url(pkg, image)
        licenses: list[Any] = []
        if pkg.license:
            expr, spdx_only = licences.expression(pkg.license)
            licenses = [LicenseExpression(expr) if spdx_only else DisjunctiveLicense(name=pkg.license)]
        props = [Property(name="kiln:arch", value=pkg.arch)] if pkg.arch else []
        if pkg.suite:
            props.append(Property(name="kiln:suite", value=pkg.suite))
        components.append(Component(type=ComponentType.LIBRARY, name=pkg.name, version=pkg.version, purl=purl,
                                    bom_ref=purl.to_string(), licenses=licenses, properties=props))
    bom.components.update(components)
    bom.register_dependency(root, components)
    return bom


def spdx_json(document: Document) -> str:
    """The document as JSON, through spdx-tools' writer, which validates it first."""
    stream = io.StringIO()
    try:
        write_document_to_stream(document, stream, validate=True)
    except ValueError as exc:
        raise SbomError(f"the SPDX document is not valid: {str(exc)[:300]}") from None
    return stream.getvalue() + "\n"


def cyclonedx_json(bom: Bom) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library's advice on incomplete dependency graphs
        text = JsonV1Dot6(bom).output_as_string(indent=2)
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    if error is not None:
        raise SbomError(f"the CycloneDX document is not valid: {str(error).splitlines()[0][:300]}")
    return text + "\n"


def sbom_names(image_name: str) -> tuple[str, str]:
    return image_name + SPDX_SUFFIX, image_name + CYCLONEDX_SUFFIX


def write_sboms(out: Path, packages: Iterable[Mapping[str, Any]], image: ImageFacts) -> list[SbomRecord]:
    """NAME.spdx.json and NAME.cdx.json in `out` (each written whole, then renamed into place)."""
    typed = installed_packages(packages)
    spdx_name, cdx_name = sbom_names(image.name)
    records = []
    for name, fmt, text in ((spdx_name, SPDX_FORMAT, spdx_json(spdx_document(typed, image))),
                            (cdx_name, CYCLONEDX_FORMAT, cyclonedx_json(cyclonedx_bom(typed, image)))):
        write_replacing(out / name, text)
        records.append(SbomRecord(file=name, format=fmt, sha256=hashlib.sha256(text.encode()).hexdigest()))
    return records


# ---------------------------------------------------------------------------------------------------
# reading them back (kiln verify)


def _json(text: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise SbomError(f"{where}: not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise SbomError(f"{where}: not a JSON object")
    return data


def spdx_packages(text: str, where: str) -> list[tuple[str, str, str]]:
    """The packages (by purl) of an SPDX JSON document, after spdx-tools' parser and full validator."""
    data = _json(text, where)
    if data.get("spdxVersion") != "SPDX-2.3":
        raise SbomError(f"{where}: not an SPDX 2.3 document (spdxVersion {str(data.get('spdxVersion'))[:40]!r})")
    try:
        document = JsonLikeDictParser().parse(data)  # type: ignore[no-untyped-call]
    except Exception as exc:  # spdx-tools' SPDXParsingError and whatever a hostile document provokes
        messages = getattr(exc, "messages", None) or [str(exc)]
        raise SbomError(f"{where}: not a valid SPDX document: {' '.join(str(messages[0]).split())[:300]}") from None
    problems = validate_full_spdx_document(document)
    if problems:
        raise SbomError(f"{where}: SPDX validation: {' '.join(problems[0].validation_message.split())[:300]}"
                        + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    found = []
    for pkg in document.packages:
        purls = [r.locator for r in pkg.external_references if r.reference_type == "purl"]
        if pkg.spdx_id == "SPDXRef-Image":
            continue
        if len(purls) != 1:
            raise SbomError(f"{where}: package {pkg.name!r} has {len(purls)} purls, not one")
        found.append(_purl_package(purls[0], where))
    return found


def cyclonedx_packages(text: str, where: str) -> list[tuple[str, str, str]]:
    """The packages (by purl) of a CycloneDX JSON BOM, after cyclonedx-python-lib's strict schema validator."""
    data = _json(text, where)
    version = _CYCLONEDX_VERSIONS.get(str(data.get("specVersion")))
    if data.get("bomFormat") != "CycloneDX" or version is None:
        raise SbomError(f"{where}: not a CycloneDX 1.5 or later BOM (bomFormat {str(data.get('bomFormat'))[:40]!r}, "
                        f"specVersion {str(data.get('specVersion'))[:20]!r})")
    error = JsonStrictValidator(version).validate_str(text)
    if error is not None:
        raise SbomError(f"{where}: CycloneDX validation: {' '.join(str(error).split())[:300]}")
    found = []
    for component in data.get("components") or []:
        purl = component.get("purl")
        if not isinstance(purl, str):
            raise SbomError(f"{where}: component {str(component.get('name'))[:80]!r} has no purl")
        found.append(_purl_package(purl, where))
    return found


def _purl_package(purl: str, where: str) -> tuple[str, str, str]:
    try:
        return package_of_purl(purl)
    except ValueError as exc:
        raise SbomError(f"{where}: {purl[:120]!r} is not a package URL: {exc}") from None


def compare_packages(listed: list[tuple[str, str, str]], manifest: Iterable[Mapping[str, Any]], where: str) -> None:
    """`listed` (an SBOM's packages) must be exactly the manifest's packages, each once."""
    expected = sorted(p.key for p in installed_packages(manifest))
    got = sorted(listed)
    if got == expected:
        return
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    dupes = sorted({p for p in got if got.count(p) > 1})

    def show(items: list[tuple[str, str, str]]) -> str:
        return ", ".join(f"{n} {v} {a}".strip() for n, v, a in items[:3]) + (" …" if len(items) > 3 else "")
    detail = "; ".join(part for part in (
        f"{len(missing)} of the manifest's packages missing ({show(missing)})" if missing else "",
        f"{len(extra)} not in the manifest ({show(extra)})" if extra else "",
        f"listed twice: {show(dupes)}" if dupes else "") if part)
    raise SbomError(f"{where}: lists {len(got)} packages, the manifest {len(expected)}: {detail}")
