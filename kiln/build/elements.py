"""DIB-compatible elements: discovery on a search path, dependency resolution, hooks per phase.

An element is a directory named after it. `element-deps` (one name a line) expands the set
transitively, `element-provides` satisfies a name. Hooks of all elements are merged per phase and run in
name order (C locale); two elements shipping the same hook name in one phase is an error.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kiln.model.errors import ElementError
from kiln.model.names import is_plain_name

log = logging.getLogger("kiln.elements")

KILN_ELEMENTS = Path(__file__).resolve().parents[2] / "elements"

PHASES: tuple[str, ...] = (
    "root.d",
    "extra-data.d",
    "pre-install.d",
    "install.d",
    "post-install.d",
    "post-root.d",
    "block-device.d",
    "pre-finalise.d",
    "finalise.d",
    "cleanup.d",
)
IN_CHROOT_PHASES = frozenset({"pre-install.d", "install.d", "post-install.d", "finalise.d"})
# dib-run-parts runs only names like this; other files in a phase dir are data (patches, templates)
HOOK_NAME_RE = re.compile(r"^[0-9A-Za-z_-]+$")
# an element kiln implements natively (the distro base, the disk, package installs) carries this file;
# kiln's copy is used even when an element of the same name stands earlier on the search path
NATIVE_MARKER = "kiln-native"
# the element a spec's `distro:` always brings: the bootstrapped base. DIB's `debian` and `ubuntu` are
# fuller (sshd, cloud-init, its package list): kiln ships them too, included when a spec or DIB line names them
DISTRO_BASE_ELEMENTS = {"debian": "debian-minimal", "ubuntu": "ubuntu-minimal"}


def base_element(distro: str) -> str:
    return DISTRO_BASE_ELEMENTS.get(distro, distro)


@dataclass(frozen=True)
class Element:
    name: str
    path: Path
    deps: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    # from an element library (diskimage-builder's), not from kiln or the user's own directories
    library: bool = False

    @property
    def content_hash(self) -> str:
        return tree_hash(self.path)

    @property
    def origin(self) -> str:
        """Where the element came from: kiln's own (natively implemented or shipped), diskimage-builder's
        library, or the user's element directories."""
        if self.library:
            return "diskimage-builder"
        return "kiln" if self.path.parent == KILN_ELEMENTS else "user"


@dataclass(frozen=True)
class Hook:
    element: str
    phase: str
    name: str
    path: Path

    @property
    def in_chroot(self) -> bool:
        return self.phase in IN_CHROOT_PHASES


@dataclass
class ResolvedElements:
    elements: list[Element]
    requested: list[str]
    provided: dict[str, str] = field(default_factory=dict)
    search_path: list[Path] = field(default_factory=list)  # where they were looked for
    libraries: list[Path] = field(default_factory=list)  # the element libraries (DIB's) on that path

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.elements]

    def get(self, name: str) -> Element:
        for e in self.elements:
            if e.name == name:
                return e
        raise KeyError(name)


def tree_hash(root: Path) -> str:
    """Hash of a directory: every entry's relative path, type, permission bits and bytes or link target.

    Timestamps and ownership are left out on purpose: touching a file must not change the key.
    """
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            h.update(rel.encode() + b"\0")
            h.update(f"{stat.S_IFMT(st.st_mode):o}:{stat.S_IMODE(st.st_mode):o}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(full).encode())
            elif stat.S_ISREG(st.st_mode):
                try:
                    with open(full, "rb") as fh:
                        for chunk in iter(lambda: fh.read(1 << 20), b""):
                            h.update(chunk)
                except OSError as exc:
                    raise ElementError(f"cannot read {full}: {exc.strerror}") from None
            h.update(b"\0")
    return h.hexdigest()


def _read_names(path: Path, element: str) -> tuple[str, ...]:
    if not path.is_file():
        return ()
    names = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        word = line.split("#", 1)[0].strip()
        if not word:
            continue
        if not is_plain_name(word):
            raise ElementError(f"element {element!r}: {path.name} line {n}: {word!r} is not a valid element name")
        names.append(word)
    return tuple(names)


def installed_dib_library() -> Path | None:
    """The element directory of the installed diskimage-builder package, if there is one."""
    spec = importlib.util.find_spec("diskimage_builder")
    if spec is None or spec.origin is None:
        return None
    return (Path(spec.origin).parent / "elements").resolve()


def dib_library() -> Path:
    """The element directory of the installed diskimage-builder package (for --dib-elements)."""
    library = installed_dib_library()
    if library is None:
        raise ElementError("--dib-elements: the diskimage-builder package is not installed "
                           "(pip install diskimage-builder, or `pip install -e '.[dib]'`)")
    return library


def libraries_on(path: Sequence[Path], library: Sequence[Path] = ()) -> list[Path]:
    """The element libraries among `path`: those given, and DIB's own library however it was reached
    (--dib-elements, or ELEMENTS_PATH pointing at it as DIB's docs tell its users)."""
    found = [p.resolve() for p in library]
    dib = installed_dib_library()
    if dib is not None and dib in path and dib not in found:
        found.append(dib)
    return found


def search_path(extra: Sequence[str | Path] = (), env: str | None = None,
                library: Sequence[Path] = ()) -> list[Path]:
    """The element search path: --elements-path entries, then ELEMENTS_PATH, then element libraries such as
    diskimage-builder's (--dib-elements), then kiln's own elements.

    The user's directories come first so an operator's element of the same name (e.g. their own
    cloud-init-cfg) wins over the one kiln ships, as in diskimage-builder.
    """
    env = os.environ.get("ELEMENTS_PATH", "") if env is None else env
    paths: list[Path] = []
    for entry in [*[str(p) for p in extra], *env.split(":"), *[str(p) for p in library]]:
        if not entry:
            continue
        p = Path(entry).expanduser().resolve()
        if not p.is_dir():
            raise ElementError(f"element path {entry!r} is not a directory")
        if p not in paths:
            paths.append(p)
    if KILN_ELEMENTS not in paths:
        paths.append(KILN_ELEMENTS)
    return paths


def find_element(name: str, path: Sequence[Path], library: Sequence[Path] = ()) -> Element | None:
    native = KILN_ELEMENTS / name
    if (native / NATIVE_MARKER).is_file():
        shadowed = [d / name for d in path if d != KILN_ELEMENTS and (d / name).is_dir()]
        if shadowed:
            log.info("element %r: kiln implements it natively; ignoring %s", name, ", ".join(map(str, shadowed)))
        path = [KILN_ELEMENTS]
    for directory in path:
        candidate = directory / name
        if candidate.is_dir():
            return Element(
                name=name,
                path=candidate,
                deps=_read_names(candidate / "element-deps", name),
                provides=_read_names(candidate / "element-provides", name),
                library=directory in library,
            )
    return None


def resolve(requested: Iterable[str], path: Sequence[Path], library: Sequence[Path] = ()) -> ResolvedElements:
    """Expand `requested` through element-deps; names may be satisfied by element-provides.

    A name nobody ships or provides is an error naming who asked for it.
    """
    wanted = list(dict.fromkeys(requested))
    for name in wanted:
        if not is_plain_name(name):
            shown = name if len(name) <= 80 else name[:60] + f"… ({len(name)} characters)"
            raise ElementError(f"{shown!r} is not a valid element name (letters, digits, '.', '_', '+', '-', at "
                               "most 128 of them)")
    included: dict[str, Element] = {}
    asked_by: dict[str, str] = {name: "the image spec" for name in wanted}
    queue = list(wanted)
    unresolved: list[str] = []
    while queue:
        name = queue.pop(0)
        if name in included:
            continue
        element = find_element(name, path, library)
        if element is None:
            unresolved.append(name)
            continue
        included[name] = element
        for dep in element.deps:
            asked_by.setdefault(dep, f"element {name!r} (element-deps)")
            queue.append(dep)
    provided: dict[str, str] = {}
    for element in included.values():
        for p in element.provides:
            if p in provided:
                raise ElementError(
                    f"{p!r} is provided by both {provided[p]!r} and {element.name!r}; use only one of them"
                )
            provided[p] = element.name
    for p, by in provided.items():
        if p in included:
            raise ElementError(f"element {p!r} is included, but {by!r} also provides it; use only one of them")
    missing = [n for n in dict.fromkeys(unresolved) if n not in provided]
    if missing:
        where = ", ".join(str(p) for p in path)
        lines = [f"element {n!r} (asked for by {asked_by.get(n, '?')}) not found on the search path" for n in missing]
        raise ElementError("\n".join(lines) + f"\n  search path: {where}")
    elements = sorted(included.values(), key=lambda e: e.name)
    return ResolvedElements(elements=elements, requested=wanted, provided=provided, search_path=list(path),
                            libraries=list(library))


def resolve_image(distro: str, names: Sequence[str], *, elements_path: Sequence[str | Path] = (),
                  env_path: str = "", dib_elements: bool = False) -> ResolvedElements:
    """An image's elements as a build resolves them: the distro's base and `names`, searched on --elements-path,
    ELEMENTS_PATH (`env_path`) and DIB's library (with `dib_elements`, or where the path names it)."""
    asked = [dib_library()] if dib_elements else []
    path = search_path(elements_path, env_path, asked)
    return resolve([base_element(distro), *names], path, libraries_on(path, asked))


@dataclass(frozen=True)
class ElementCheck:
    """An executable from an element's checks.d, run in the booted guest by the conformance suite."""

    element: str
    file: str
    content: bytes

    @property
    def name(self) -> str:
        return f"{self.element}/{self.file}"


CHECKS_DIR = "checks.d"
MAX_CHECK_BYTES = 32 * 1024  # one check
MAX_CHECKS_BYTES = 40 * 1024  # all of them: they travel in the user-data, and Nova takes 64 KiB (base64)


def element_checks(resolved: ResolvedElements) -> tuple[ElementCheck, ...]:
    """The checks.d executables of the elements, in element then name order.

    An element tree is untrusted: only regular files are read (no link followed), names are hook names,
    sizes are capped. A file without its run bit is skipped with a warning, as dib-run-parts skips it."""
    found: list[ElementCheck] = []
    total = 0
    for element in resolved.elements:
        checks = element.path / CHECKS_DIR
        try:
            st = os.lstat(checks)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise ElementError(f"element {element.name}: {checks} is not a directory")
        for entry in sorted(os.scandir(checks), key=lambda e: e.name):
            where = f"element {element.name}: {CHECKS_DIR}/{entry.name}"
            if entry.name.startswith("."):
                continue
            if not HOOK_NAME_RE.fullmatch(entry.name) or len(entry.name) > 64:
                raise ElementError(f"{where}: a check's name is up to 64 letters, digits, '_' and '-'")
            if not entry.is_file(follow_symlinks=False):
                raise ElementError(f"{where}: not a regular file (a check is read as it is, never through a link)")
            if not entry.stat(follow_symlinks=False).st_mode & 0o111:
                log.warning("%s is not executable: skipped (as dib-run-parts skips it)", where)
                continue
            with os.fdopen(os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
                content = f.read(MAX_CHECK_BYTES + 1)
            if len(content) > MAX_CHECK_BYTES:
                raise ElementError(f"{where}: over {MAX_CHECK_BYTES // 1024} KiB (checks travel in the user-data)")
            total += len(content)
            if total > MAX_CHECKS_BYTES:
                raise ElementError(f"{where}: the elements' checks exceed {MAX_CHECKS_BYTES // 1024} KiB together "
                                   "(they travel in the user-data, which Nova caps at 64 KiB)")
            found.append(ElementCheck(element.name, entry.name, content))
    return tuple(found)


def hooks_by_phase(resolved: ResolvedElements) -> dict[str, list[Hook]]:
    """All hooks, per phase, merged across elements and sorted by name in C-locale order."""
    phases: dict[str, list[Hook]] = {}
    for phase in PHASES:
        seen: dict[str, str] = {}
        hooks: list[Hook] = []
        for element in resolved.elements:
            phase_dir = element.path / phase
            if not phase_dir.is_dir():
                continue
            for entry in sorted(phase_dir.iterdir()):
                if not HOOK_NAME_RE.fullmatch(entry.name) or entry.is_dir():
                    continue
                if entry.name in seen:
                    raise ElementError(
                        f"hook {phase}/{entry.name} is shipped by both {seen[entry.name]!r} and "
                        f"{element.name!r}; rename one of them"
                    )
                if not entry.exists():
                    raise ElementError(f"element {element.name!r}: hook {phase}/{entry.name} is a dangling "
                                       f"symlink ({entry} -> {os.readlink(entry)})")
                if not os.access(entry, os.R_OK) or not _readable(entry):
                    raise ElementError(f"element {element.name!r}: hook {phase}/{entry.name} is not readable")
                if not entry.stat().st_mode & stat.S_IXUSR:
                    # as dib-run-parts does, wherever the element comes from: DIB's own wheel ships hooks
                    # without their run bit that its users never see run
                    log.warning("element %r: ignoring non-executable hook %s/%s (chmod +x %s to run it)",
                                element.name, phase, entry.name, entry)
                    continue
                seen[entry.name] = element.name
                hooks.append(Hook(element=element.name, phase=phase, name=entry.name, path=entry))
        hooks.sort(key=lambda h: h.name.encode())
        phases[phase] = hooks
    return phases


def _readable(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
        return True
    except OSError:
        return False


def environment_files(resolved: ResolvedElements) -> list[Path]:
    """environment.d files of all elements, in name order (sourced before every hook)."""
    files: list[Path] = []
    for element in resolved.elements:
        env_dir = element.path / "environment.d"
        if env_dir.is_dir():
            files += [f for f in env_dir.iterdir() if f.is_file() and not f.name.startswith(".")]
    return sorted(files, key=lambda f: (f.name.encode(), str(f)))


def shared_data_hash(resolved: ResolvedElements) -> str:
    """Hash of what any hook can read besides its own element: every element's non-hook files in the merged
    hooks directory (static/, init-scripts/, bin/, data files in phase directories).

    Hook scripts, environment.d and the element's top-level files are left out: they reach the keys through
    the owning element's hash, the environment key and the plan itself.
    """
    h = hashlib.sha256()
    for element in resolved.elements:
        for child in sorted(element.path.iterdir()):
            if not child.is_dir() or child.name == "environment.d":
                continue
            if child.name in PHASES:
                for entry in sorted(child.iterdir()):
                    if HOOK_NAME_RE.fullmatch(entry.name) and not entry.is_dir():
                        continue
                    h.update(f"{element.name}/{child.name}/{entry.name}\0".encode())
                    h.update((tree_hash(entry) if entry.is_dir() else _entry_hash(entry)).encode())
            else:
                h.update(f"{element.name}/{child.name}\0{tree_hash(child)}".encode())
    return h.hexdigest()


def _entry_hash(path: Path) -> str:
    st = os.lstat(path)
    h = hashlib.sha256(f"{stat.S_IMODE(st.st_mode):o}".encode())
    h.update(os.readlink(path).encode() if stat.S_ISLNK(st.st_mode) else path.read_bytes())
    return h.hexdigest()
