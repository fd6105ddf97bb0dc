"""package-installs.yaml / .json and pkg-map, as diskimage-builder defines them.

Each element may declare packages to install (or uninstall) per phase, filtered by architecture and
`when` conditions on DIB variables, with names translated through the element's own `pkg-map` for the
image's distro family, distro and release.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from kiln.build.elements import Element, ResolvedElements
from kiln.model.errors import ElementError

# DIB's distro families: pkg-map's "family" tables and the package manager install-packages uses
FAMILIES = {"debian": "debian", "ubuntu": "debian", "fedora": "redhat", "centos": "redhat", "rocky": "redhat",
            "almalinux": "redhat", "rhel": "redhat"}


def family_of(distro: str) -> str:
    return FAMILIES.get(distro, distro)
PACKAGE_PHASES = ("pre-install.d", "install.d", "post-install.d")
_KNOWN_KEYS = {"phase", "arch", "not-arch", "uninstall", "when", "installtype", "dib_python_version"}


@dataclass(frozen=True)
class PackageAction:
    element: str
    phase: str
    package: str
    uninstall: bool = False


def _load(element: Element) -> dict[str, Any]:
    for name in ("package-installs.yaml", "package-installs.json"):
        path = element.path / name
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text()) if name.endswith("yaml") else json.loads(path.read_text())
            except (yaml.YAMLError, ValueError) as exc:
                raise ElementError(f"element {element.name!r}: {name} is malformed: {exc}") from None
            if data is None:
                return {}
            if not isinstance(data, dict):
                raise ElementError(f"element {element.name!r}: {name} must map package names to options")
            return data
    return {}


def _pkg_map(element: Element) -> dict[str, Any]:
    path = element.path / "pkg-map"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ElementError(f"element {element.name!r}: pkg-map is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ElementError(f"element {element.name!r}: pkg-map must be a JSON object")
    return data


def map_package(name: str, pkg_map: Mapping[str, Any], *, distro: str, release: str) -> str:
    """Translate a package name with DIB's pkg-map precedence: release, distro, family, default."""
    family = family_of(distro)
    candidates = [
        pkg_map.get("release", {}).get(distro, {}).get(release, {}),
        pkg_map.get("distro", {}).get(distro, {}),
        pkg_map.get("family", {}).get(family, {}),
        pkg_map.get("default", {}),
    ]
    for table in candidates:
        if isinstance(table, dict) and name in table:
            return str(table[name])
    return name


def _when_ok(cond: str | list[str], env: Mapping[str, str]) -> bool:
    conds = [cond] if isinstance(cond, str) else cond
    for c in conds:
        m = re.match(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(!?=)\s*(.*?)\s*$", c)
        if not m:
            raise ValueError(f"bad 'when' condition {c!r}")
        var, op, value = m.groups()
        equal = env.get(var, "") == value
        if equal != (op == "="):
            return False
    return True


def _arch_list(value: Any) -> list[str]:
    return [a.strip() for a in str(value).split(",") if a.strip()]


def package_actions(
    resolved: ResolvedElements, *, distro: str, release: str, arch: str, env: Mapping[str, str]
) -> list[PackageAction]:
    """Every package action of every element, after filters and name mapping, in element order."""
    actions: list[PackageAction] = []
    for element in resolved.elements:
        data = _load(element)
        pkg_map = _pkg_map(element)
        for package, options in data.items():
            entries = options if isinstance(options, list) else [options or {}]
            for opts in entries:
                if not isinstance(opts, dict):
                    raise ElementError(f"element {element.name!r}: package-installs entry {package!r} is not a mapping")
                unknown = set(opts) - _KNOWN_KEYS
                if unknown:
                    raise ElementError(
                        f"element {element.name!r}: package-installs entry {package!r} has unknown keys "
                        + ", ".join(sorted(unknown))
                    )
                phase = opts.get("phase", "install.d")
                if phase not in PACKAGE_PHASES:
                    raise ElementError(
                        f"element {element.name!r}: package {package!r} has phase {phase!r}; "
                        f"expected one of {', '.join(PACKAGE_PHASES)}"
                    )
                if "arch" in opts and arch not in _arch_list(opts["arch"]):
                    continue
                if "not-arch" in opts and arch in _arch_list(opts["not-arch"]):
                    continue
                if opts.get("installtype", "package") not in ("package", None):
                    continue
                if "when" in opts:
                    try:
                        if not _when_ok(opts["when"], env):
                            continue
                    except ValueError as exc:
                        raise ElementError(f"element {element.name!r}: package {package!r}: {exc}") from None
                mapped = map_package(str(package), pkg_map, distro=distro, release=release)
                for name in mapped.split():
                    actions.append(
                        PackageAction(element.name, phase, name, uninstall=bool(opts.get("uninstall", False)))
                    )
    return actions


def for_phase(actions: list[PackageAction], phase: str, *, uninstall: bool) -> list[str]:
    return sorted({a.package for a in actions if a.phase == phase and a.uninstall == uninstall})
