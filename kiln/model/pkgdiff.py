"""What two builds differ in: the content digest that says whether a rebuild changed anything an image's
user could see, and the package diff between two manifests (added, removed, upgraded old -> new,
downgraded), with the packages that came from a security suite marked.

The content of a build is its package list (name, version, architecture), its elements (name and
content hash) and its spec without where it is published (`publish`) or how it was boot-tested
(`boot_test`): two builds with the same content are the same image to a user even though their bytes
differ (timestamps, file system UUIDs), so a nightly refresh publishes nothing new for them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from debian.debian_support import version_compare

from kiln.model.errors import KilnError
from kiln.model.facts import is_security_suite

# spec fields that do not change what is in the image
NOT_CONTENT = ("publish", "boot_test")


class DiffInputError(KilnError):
    """A manifest to compare cannot be read; the message names it."""

    exit_code = 2


def content_digest(manifest: Mapping[str, Any]) -> str:
    spec = {k: v for k, v in (manifest.get("spec") or {}).items() if k not in NOT_CONTENT}
    content = {
        "packages": sorted([str(p.get("name")), str(p.get("version")), str(p.get("arch", ""))]
                           for p in manifest.get("packages") or []),
        "elements": sorted([str(e.get("name")), str(e.get("sha256", ""))] for e in manifest.get("elements") or []),
        "spec": spec,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _is_security(package: Mapping[str, Any]) -> bool:
    return is_security_suite(str(package.get("suite", "")))


@dataclass
class PackageDiff:
    old_build: str = ""
    new_build: str = ""
    added: list[dict[str, Any]] = field(default_factory=list)  # name, version, security
    removed: list[dict[str, Any]] = field(default_factory=list)  # name, version
    upgraded: list[dict[str, Any]] = field(default_factory=list)  # name, old, new, security
    downgraded: list[dict[str, Any]] = field(default_factory=list)  # name, old, new

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.upgraded or self.downgraded)

    @property
    def security(self) -> int:
        return sum(1 for p in [*self.added, *self.upgraded] if p.get("security"))

    def summary(self) -> str:
        """One line: '3 upgraded (2 security), 1 added, 0 removed'."""
        if self.empty:
            return "no package changes"
        parts = [f"{len(self.upgraded)} upgraded" + (f" ({self.security} security)" if self.security else "")]
        if self.added:
            parts.append(f"{len(self.added)} added")
        if self.removed:
            parts.append(f"{len(self.removed)} removed")
        if self.downgraded:
            parts.append(f"{len(self.downgraded)} downgraded")
        return ", ".join(parts)

    def lines(self) -> list[str]:
        """The diff for people: one line a package, security uploads marked."""
        out = []
        for p in self.upgraded:
            out.append(f"  ~ {p['name']} {p['old']} -> {p['new']}{'  [security]' if p.get('security') else ''}")
        for p in self.added:
            out.append(f"  + {p['name']} {p['version']}{'  [security]' if p.get('security') else ''}")
        for p in self.removed:
            out.append(f"  - {p['name']} {p['version']}")
        for p in self.downgraded:
            out.append(f"  ! {p['name']} {p['old']} -> {p['new']} (downgraded)")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary()}


def version_newer(a: str, b: str) -> bool:
    """Whether package version `a` is newer than `b`: by dpkg's ordering (epochs, `~` before anything), as
    python-debian implements it, for a version Debian's rules accept; else (an RPM's `5.14.0-427.el9_4`) by
    rpm's (rpmvercmp)."""
    try:
        return version_compare(a, b) > 0
    except ValueError:
        return rpm_version_compare(a, b) > 0


def rpm_version_compare(a: str, b: str) -> int:
    """rpm's comparison of two [EPOCH:]VERSION[-RELEASE] strings: -1, 0 or 1."""
    def split(v: str) -> tuple[int, str, str]:
        epoch, sep, rest = v.partition(":")
        if not (sep and epoch.isdigit()):
            epoch, rest = "0", v
        version, _, release = rest.rpartition("-") if "-" in rest else (rest, "", "")
        return int(epoch), version, release

    (ea, va, ra), (eb, vb, rb) = split(a), split(b)
    return (ea > eb) - (ea < eb) or _rpmvercmp(va, vb) or _rpmvercmp(ra, rb)


def _rpmvercmp(a: str, b: str) -> int:
    """rpm's rpmvercmp: digit and letter runs compared in turn (digits numerically, and newer than
    letters), separators ignored, `~` older and `^` newer than anything after the common part."""
    if a == b:
        return 0
    i = j = 0
    while i < len(a) or j < len(b):
        while i < len(a) and not a[i].isalnum() and a[i] not in "~^":
            i += 1
        while j < len(b) and not b[j].isalnum() and b[j] not in "~^":
            j += 1
        ta, tb = a[i:i + 1], b[j:j + 1]
        if ta == "~" or tb == "~":
            if ta != "~":
                return 1
            if tb != "~":
                return -1
            i, j = i + 1, j + 1
            continue
        if ta == "^" or tb == "^":
            if not ta:
                return -1
            if not tb:
                return 1
            if ta != "^":
                return 1
            if tb != "^":
                return -1
            i, j = i + 1, j + 1
            continue
        if not ta or not tb:
            break
        numeric = ta.isdigit()
        same_kind = str.isdigit if numeric else str.isalpha
        si, sj = i, j
        while i < len(a) and same_kind(a[i]):
            i += 1
        while j < len(b) and same_kind(b[j]):
            j += 1
        pa, pb = a[si:i], b[sj:j]
        if not pb:  # a number against letters: the number is newer
            return 1 if numeric else -1
        if numeric:
            pa, pb = pa.lstrip("0"), pb.lstrip("0")
            if len(pa) != len(pb):
                return 1 if len(pa) > len(pb) else -1
        if pa != pb:
            return 1 if pa > pb else -1
    rest_a, rest_b = i < len(a), j < len(b)
    return (rest_a > rest_b) - (rest_a < rest_b)


def package_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> PackageDiff:
    """The package diff from manifest `old` to manifest `new`."""
    before = {(str(p["name"]), str(p.get("arch", ""))): p for p in old.get("packages") or []}
    after = {(str(p["name"]), str(p.get("arch", ""))): p for p in new.get("packages") or []}
    diff = PackageDiff(str(old.get("build_id", "")), str(new.get("build_id", "")))
    for key in sorted(after.keys() - before.keys()):
        p = after[key]
        diff.added.append({"name": key[0], "version": p["version"], "security": _is_security(p)})
    for key in sorted(before.keys() - after.keys()):
        diff.removed.append({"name": key[0], "version": before[key]["version"]})
    for key in sorted(before.keys() & after.keys()):
        o, n = str(before[key]["version"]), str(after[key]["version"])
        if o == n:
            continue
        if version_newer(n, o):
            diff.upgraded.append({"name": key[0], "old": o, "new": n, "security": _is_security(after[key])})
        else:
            diff.downgraded.append({"name": key[0], "old": o, "new": n})
    return diff


def diff_from_dict(data: Mapping[str, Any]) -> PackageDiff:
    return PackageDiff(**{k: data[k] for k in ("old_build", "new_build", "added", "removed", "upgraded",
                                                "downgraded") if k in data})


def load_manifest(path: Path) -> dict[str, Any]:
    """manifest.json of an output directory, or a manifest file itself."""
    target = path / "manifest.json" if path.is_dir() else path
    try:
        data = json.loads(target.read_text())
    except FileNotFoundError:
        raise DiffInputError(f"{target}: no such file (give a kiln output directory or its manifest.json)") from None
    except (OSError, ValueError) as exc:
        raise DiffInputError(f"{target}: not a readable kiln manifest: {exc}") from None
    if not isinstance(data, dict) or "packages" not in data or "build_id" not in data:
        raise DiffInputError(f"{target}: not a kiln manifest (it has no build_id and packages)")
    return data
