"""What a finished tree holds and what takes its space, read at pack time from the mounted tree (never chrooted
into): the licence each installed package declares, and the largest directories and packages.

The tree is an image's, built from hostile inputs: files are opened only when they are regular files inside it
(links resolved within the tree), read up to a bound, and a malformed file means "declares nothing".
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath

from debian.copyright import Copyright
from debian.copyright import Error as CopyrightError
from debian.deb822 import Deb822

from kiln.host.run import output
from kiln.host.treepath import regular_file_in_root
from kiln.model.record import SpaceRecord, SpaceUse

log = logging.getLogger("kiln.pack")
# python-debian warns of every old-style Format: URL it corrects (a third of Debian's packages): not news
logging.getLogger("debian.copyright").setLevel(logging.ERROR)

COPYRIGHT_MAX_BYTES = 1 << 20  # the largest copyright files of Debian (the kernel's) are ~200 KiB
TOP = 15  # directories and packages listed in the space report
MAX_LICENSES = 8  # distinct licences named for one package without a `Files: *` stanza


def declared_license(root: Path, package: str) -> str | None:
    """The licence the package's machine-readable copyright file (DEP-5) declares for its files: the
    `Files: *` stanza's licence, else the distinct licences of all its stanzas joined with AND; None when the
    file is absent, not machine-readable or malformed."""
    path = regular_file_in_root(root, PurePosixPath("usr/share/doc") / package / "copyright")
    if path is None:
        return None
    try:
        with path.open("rb") as f:
            data = f.read(COPYRIGHT_MAX_BYTES + 1)
        if len(data) > COPYRIGHT_MAX_BYTES:
            return None
        parsed = Copyright(data.decode("utf-8", errors="replace").splitlines(), strict=False)
        stanzas = list(parsed.all_files_paragraphs())
    except (CopyrightError, ValueError, OSError, UnicodeError, AttributeError):
        return None
    synopses: list[tuple[tuple[str, ...], str]] = []
    for stanza in stanzas:
        license_ = stanza.license
        synopsis = str(getattr(license_, "synopsis", "") or "").strip()
        if synopsis:
            synopses.append((tuple(stanza.files), synopsis))
    main = next((s for files, s in synopses if "*" in files), None)
    if main:
        return main
    distinct = list(dict.fromkeys(s for _, s in synopses))[:MAX_LICENSES]
    return " AND ".join(distinct) if distinct else None


def with_licenses(root: Path, packages: list[dict[str, str]]) -> list[dict[str, str]]:
    """`packages` with a `license` key where the package declares one (RPM packages carry theirs already)."""
    found = []
    for p in packages:
        if "license" not in p:
            declared = declared_license(root, p["name"])
            p = {**p, "license": declared} if declared else p
        found.append(p)
    log.info("pack: %d of %d packages declare their licence", sum(1 for p in found if "license" in p), len(found))
    return found


def _dpkg_sizes(root: Path) -> list[SpaceUse]:
    """Installed-Size of every installed package, from the tree's dpkg database (KiB, as dpkg counts)."""
    status = regular_file_in_root(root, "var/lib/dpkg/status")
    if status is None:
        return []
    sizes = []
    with status.open(encoding="utf-8", errors="replace") as f:
        for para in Deb822.iter_paragraphs(f):
            if para.get("Status", "").endswith(" installed") and para.get("Installed-Size", "").isdigit():
                sizes.append(SpaceUse(path=para.get("Package", "?"), bytes=int(para["Installed-Size"]) * 1024))
    return sizes


def space_report(root: Path, family: str = "debian") -> SpaceRecord:
    """The tree's size and what takes it: its largest directories (two levels down, as `du -x` counts blocks on
    this file system, links not followed) and its largest packages (dpkg's Installed-Size)."""
    text = output(["du", "-x", "-0", "-B1", "-d", "2", str(root)], timeout=600)
    total = 0
    directories = []
    for entry in text.split("\0"):
        size, _, name = entry.partition("\t")
        if not size.isdigit():
            continue
        rel = PurePosixPath(name).relative_to(PurePosixPath(root)) if name != str(root) else None
        if rel is None:
            total = int(size)
        else:
            directories.append(SpaceUse(path=f"/{rel}", bytes=int(size)))
    # a directory's size includes its children's: list both levels, the largest first
    directories.sort(key=lambda d: (-d.bytes, d.path))
    packages = sorted(_dpkg_sizes(root) if family == "debian" else [], key=lambda d: (-d.bytes, d.path))
    return SpaceRecord(tree_bytes=total, directories=directories[:TOP], packages=packages[:TOP])
