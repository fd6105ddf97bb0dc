"""What diskimage-builder's distribution elements give, derived from DIB's own element files, next to what
kiln's elements of the same name give.

DIB's side is computed with DIB's code: its element-deps resolution (`element_dependencies.get_elements`),
its package-installs squash (`package-installs-squash`'s `collect_data`, with its arch and `when` filters)
and its `pkg-map` script. kiln's side is kiln's own resolution and package-installs reading, for the same
element on a line with `vm` (as every DIB image line has it). A DIB release that adds a package or an
element-dep shows up as a difference the test reports, unless it is listed below with kiln's reason.

`python -m tests.dib_parity` prints the table docs/dib-compatibility.md carries (`--write` updates it).
"""

from __future__ import annotations

import collections
import functools
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from kiln.build import elements as kiln_elements
from kiln.build import packages as kiln_packages

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "dib-compatibility.md"
BEGIN, END = "<!-- dib-parity:begin -->", "<!-- dib-parity:end -->"

# kiln's native distribution elements: the distro and release they are compared for
NATIVE = {"debian": ("debian", "bookworm"), "debian-minimal": ("debian", "bookworm"),
          "ubuntu": ("ubuntu", "noble"), "ubuntu-minimal": ("ubuntu", "noble"),
          "centos": ("centos", "9-stream"), "fedora": ("fedora", "41")}
# compared by name only: no Red Hat family mirror or cloud image is reachable from these machines, so no
# image of theirs has been built to install these packages for real (the table says so)
NEVER_BUILT = {"centos", "fedora"}
NOT_COMPARED = {
    "rocky": "DIB 3.43 has no `rocky` element (only rocky-container)",
    "almalinux": "DIB 3.43 has no `almalinux` element",
}

# DIB elements of a distribution element's closure that kiln has no element of that name for: how kiln
# gives the same (or why not)
ELEMENT_EQUIVALENTS = {
    "debootstrap": "kiln bootstraps the base itself with mmdebstrap",
    "pkg-map": "kiln reads every element's pkg-map itself",
    "dib-init-system": "kiln's images run systemd; the `dib-init-system` helper is on the hooks' PATH",
    "runtime-ssh-host-keys": "kiln's `openssh-server` makes the host keys at first boot (kiln-ssh-host-keys)",
    "install-static": "kiln's elements carry no static/ trees; DIB elements that do pull DIB's install-static",
    "install-bin": "kiln's elements carry no bin/ files; DIB elements that do pull DIB's install-bin",
    "manifests": "kiln records the build in manifest.json beside the image, not in /etc/dib-manifests",
    "modprobe": "no effect unless DIB_MODPROBE_BLACKLIST is set; add DIB's `modprobe` (--dib-elements) to use it",
    "cache-url": "kiln downloads into its own store (DIB's cache-url serves DIB's image download)",
    "cloud-init-datasources": "kiln's `cloud-init` sets DIB_CLOUD_INIT_DATASOURCES the same way",
    "dkms": "kiln's `ubuntu` and `fedora` install the dkms package themselves",
    "rpm-distro": "kiln's `install-packages` runs dnf (or yum) for the redhat family; rpm-distro's tweaks "
                  "(requiretty, secure_path, zeroconf routes, yum arch) are not made",
    "yum": "kiln's `install-packages` runs dnf (or yum), from the repositories the cloud image has",
    "selinux-fixfiles-restore": "kiln's `redhat-common` leaves /.autorelabel: the first boot relabels "
                                "(and reboots once) instead of setfiles at build time",
    "source-repositories": "kiln has no source-repositories (DIB's git/tar fetching for elements); add "
                           "DIB's (--dib-elements) to use it; its git-core is installed",
    "ubuntu-common": "kiln's `ubuntu` does its work (sysprep, IPv6 privacy extensions off); apt autoremove "
                     "is left out: kiln's images keep what their elements installed",
}

# packages DIB's element installs that kiln's gives differently: (element, package) -> kiln's way
PACKAGE_EQUIVALENTS = {
    ("debian-minimal", "linux-image-amd64"): "kiln's kernel comes from `vm`: linux-image-cloud-amd64",
    ("debian", "linux-image-amd64"): "kiln's kernel comes from `vm`: linux-image-cloud-amd64",
    ("ubuntu-minimal", "linux-image-generic"): "kiln's kernel comes from `vm`",
    ("ubuntu", "linux-image-generic"): "kiln's kernel comes from `vm`",
}

# the variables DIB's `when:` conditions read, as a default build has them
DIB_ENV = {"ARCH": "amd64", "DIB_INIT_SYSTEM": "systemd", "DIB_PYTHON_VERSION": "3",
           "DIB_UBUNTU_KERNEL": "linux-image-generic", "DIB_DEBIAN_COMPONENTS": "main"}


@dataclass
class Parity:
    element: str
    distro: str
    release: str
    dib_elements: list[str] = field(default_factory=list)
    dib_packages: list[str] = field(default_factory=list)
    kiln_elements: list[str] = field(default_factory=list)
    kiln_packages: list[str] = field(default_factory=list)

    @property
    def missing_elements(self) -> list[str]:
        return [e for e in self.dib_elements if e not in self.kiln_elements and e not in ELEMENT_EQUIVALENTS]

    @property
    def missing_packages(self) -> list[str]:
        return [p for p in self.dib_packages
                if p not in self.kiln_packages and (self.element, p) not in PACKAGE_EQUIVALENTS]


def dib_library() -> Path:
    library = kiln_elements.installed_dib_library()
    if library is None:
        raise RuntimeError("diskimage-builder is not installed (pip install -e '.[dib]')")
    return library


@functools.cache
def _squash() -> ModuleType:
    """DIB's package-installs-squash script, loaded as a module (its collect_data is DIB's own filter)."""
    path = dib_library() / "package-installs" / "bin" / "package-installs-squash"
    loader = importlib.machinery.SourceFileLoader("dib_package_installs_squash", str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _dib_map(element_dir: Path, names: list[str], distro: str, release: str) -> list[str]:
    """Names through DIB's pkg-map script and the element's pkg-map file (as DIB's install does)."""
    pkg_map = element_dir / "pkg-map"
    if not pkg_map.is_file() or not names:
        return names
    script = dib_library() / "pkg-map" / "bin" / "pkg-map"
    out = subprocess.run([sys.executable, str(script), "--pkg-map", str(pkg_map), "--distro", distro,
                          "--release", release, "--missing-ok", *names], capture_output=True, text=True,
                         check=True).stdout
    return out.split()


def dib_side(element: str, distro: str, release: str) -> tuple[list[str], list[str]]:
    """DIB's closure of `element` and the packages it installs (install, not uninstall; after pkg-map)."""
    from diskimage_builder.element_dependencies import get_elements

    library = dib_library()
    closure = sorted(get_elements([element], str(library)))
    env = {**DIB_ENV, "DISTRO_NAME": distro, "DIB_RELEASE": release}
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        data: Any = collections.defaultdict(functools.partial(collections.defaultdict, list))
        for name, path in closure:
            for kind in ("json", "yaml"):
                f = Path(path) / f"package-installs.{kind}"
                if f.is_file():
                    data = _squash().collect_data(data, yaml.safe_load(f.read_text()) or {}, name)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    by_element: dict[str, list[str]] = collections.defaultdict(list)
    for phase in data.values():
        removed = {pkg for pkg, _ in phase["uninstall"]}
        for pkg, owner in phase["install"]:
            if pkg not in removed:
                by_element[owner].append(pkg)
    paths = dict(closure)
    packages = {p for owner, names in by_element.items()
                for p in _dib_map(Path(paths[owner]), names, distro, release)}
    return [n for n, _ in closure], sorted(packages)


def kiln_side(element: str, distro: str, release: str) -> tuple[list[str], list[str]]:
    """kiln's closure of `element` on a line with `vm`, and the packages it installs."""
    resolved = kiln_elements.resolve_image(distro, [element, "vm"])
    env = {**DIB_ENV, "DISTRO_NAME": distro, "DIB_RELEASE": release}
    actions = kiln_packages.package_actions(resolved, distro=distro, release=release, arch="amd64", env=env)
    installed = sorted({a.package for a in actions if not a.uninstall})
    return resolved.names, installed


def parity(element: str) -> Parity:
    distro, release = NATIVE[element]
    p = Parity(element, distro, release)
    p.dib_elements, p.dib_packages = dib_side(element, distro, release)
    p.kiln_elements, p.kiln_packages = kiln_side(element, distro, release)
    return p


def table() -> str:
    """The Markdown table of docs/dib-compatibility.md: per native element, DIB's element-deps and packages
    and what kiln gives for each."""
    rows = ["| element | DIB's element-deps (closure) | DIB's packages (after pkg-map) | kiln |", "|---|---|---|---|"]
    for element in NATIVE:
        p = parity(element)
        others = [e for e in p.dib_elements if e != element]
        notes = []
        for e in others:
            if e not in p.kiln_elements:
                notes.append(f"{e}: {ELEMENT_EQUIVALENTS.get(e, '**missing**')}")
        for pkg in p.dib_packages:
            if pkg not in p.kiln_packages:
                notes.append(f"{pkg}: {PACKAGE_EQUIVALENTS.get((element, pkg), '**missing**')}")
        kiln = "every element-dep and package, by name" + ("; except " + "; ".join(notes) if notes else "")
        if element in NEVER_BUILT:
            kiln += ("; **never built here**: no Red Hat family mirror or cloud image is reachable from these "
                     "machines, so the names are checked, not installed")
        rows.append(f"| {element} | {', '.join(others)} | {', '.join(p.dib_packages)} | {kiln} |")
    for element, why in NOT_COMPARED.items():
        rows.append(f"| {element} | | | {why} |")
    return "\n".join(rows)


def doc_table() -> str:
    text = DOC.read_text()
    return text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip()


def write_doc() -> None:
    text = DOC.read_text()
    DOC.write_text(text[:text.index(BEGIN) + len(BEGIN)] + "\n" + table() + "\n" + text[text.index(END):])


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_doc()
    else:
        print(table())
