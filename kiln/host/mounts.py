"""The one place kiln mounts and unmounts.

A `MountStack` records every mount it makes in a JSON journal in the build's work directory before
the mount happens, and unmounts in reverse order on every exit path. If kiln is SIGKILLed, the journal
survives and `reclaim()` (run by the next kiln command and `kiln gc`) unmounts what it lists.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from kiln.host.run import run
from kiln.model.errors import CommandError, MountError

log = logging.getLogger("kiln.mounts")

JOURNAL = "mounts.json"


_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


def decode_mount_path(field: bytes) -> str:
    """A path as the kernel writes it in mountinfo (space, tab, newline and backslash as octal escapes, the
    rest as raw bytes), as a str the way Python names that path (os.fsdecode)."""
    return os.fsdecode(_OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def mounted_targets() -> set[str]:
    """Every mount point currently in this mount namespace."""
    targets = set()
    with open("/proc/self/mountinfo", "rb") as fh:
        for line in fh:
            targets.add(decode_mount_path(line.split()[4]))
    return targets


def _umount(target: str) -> None:
    """Unmount `target`; retry while busy; lazily detach as the last resort."""
    for attempt in range(5):
        if target not in mounted_targets():
            return
        try:
            run(["umount", target], quiet=True, what=f"unmount {target}")
            return
        except CommandError:
            time.sleep(0.2 * (attempt + 1))
    if target in mounted_targets():
        log.warning("%s stayed busy; detaching it lazily", target)
        run(["umount", "--lazy", target], quiet=True, what=f"lazy unmount {target}")


class MountStack:
    """Mounts made for one purpose, torn down together, journaled in `journal_dir`."""

    def __init__(self, journal_dir: Path) -> None:
        self.journal_dir = journal_dir
        self.targets: list[str] = []

    def __enter__(self) -> MountStack:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.unmount_all()

    @property
    def journal(self) -> Path:
        return self.journal_dir / JOURNAL

    def _write_journal(self, extra: list[str]) -> None:
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        existing: list[str] = []
        if self.journal.exists():
            try:
                existing = json.loads(self.journal.read_text())
            except ValueError:
                existing = []
        merged = [t for t in existing if t not in extra] + extra
        tmp = self.journal.with_suffix(".tmp")
        tmp.write_text(json.dumps(merged))
        os.replace(tmp, self.journal)

    def _forget(self, target: str) -> None:
        if not self.journal.exists():
            return
        try:
            existing = json.loads(self.journal.read_text())
        except ValueError:
            existing = []
        remaining = [t for t in existing if t != target]
        tmp = self.journal.with_suffix(".tmp")
        tmp.write_text(json.dumps(remaining))
        os.replace(tmp, self.journal)

    def mount(self, args: Sequence[str], target: Path, *, what: str, cwd: Path | None = None) -> Path:
        """Run `mount ARGS TARGET`, journaled first so that a crash in between is reclaimed too."""
        target.mkdir(parents=True, exist_ok=True)
        t = str(target)
        self._write_journal([t])
        try:
            run(["mount", *args, t], cwd=cwd, quiet=True, what=what)
        except BaseException:
            if t not in mounted_targets():
                self._forget(t)
            raise
        self.targets.append(t)
        return target

    def bind(self, source: Path, target: Path, *, readonly: bool = False) -> Path:
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
        self.mount(["--bind", str(source)], target, what=f"bind {source} on {target}")
        if readonly:
            run(["mount", "-o", "remount,bind,ro", str(target)], quiet=True, what=f"make {target} read-only")
        return target

    def overlay(
        self, lowers: Sequence[Path], target: Path, *, upper: Path | None = None, work: Path | None = None
    ) -> Path:
        """Mount an overlay: `lowers` top first; without `upper` the mount is read-only.

        Lower paths are passed relative to their common parent (the mount runs there) so that a deep
        stack of layers stays within the kernel's one-page limit on mount options.
        """
        if not lowers:
            raise MountError("an overlay needs at least one lower layer")
        base = Path(os.path.commonpath([str(p) for p in lowers]))
        if len(lowers) == 1:
            base = lowers[0].parent
        rel = [os.path.relpath(p, base) for p in lowers]
        # the layers hold a stranger's setuid programs and device nodes (an upstream image's, a hook's mknod):
        # on this host they grant nothing and open nothing; the chroot's /dev is a mount of its own
        opts = ["lowerdir=" + ":".join(rel), "nosuid", "nodev"]
        if upper is not None:
            if work is None:
                raise MountError("an overlay with an upper directory needs a work directory")
            upper.mkdir(parents=True, exist_ok=True)
            work.mkdir(parents=True, exist_ok=True)
            opts += [f"upperdir={upper}", f"workdir={work}"]
        else:
            opts.append("ro")
        return self.mount(["-t", "overlay", "overlay", "-o", ",".join(opts)], target, cwd=base,
                          what=f"overlay mount on {target}")

    def unmount_all(self) -> None:
        errors = []
        while self.targets:
            t = self.targets.pop()
            try:
                _umount(t)
                self._forget(t)
            except CommandError as exc:
                errors.append(str(exc))
        if errors:
            raise MountError("could not unmount:\n" + "\n".join(errors))


def _mounted_under(path: Path) -> list[str]:
    top = str(path.resolve()).rstrip("/")
    return [t for t in mounted_targets() if t == top or t.startswith(top + "/")]


def unmount_under(path: Path) -> list[str]:
    """Unmount everything mounted at or below `path`, deepest first: what a killed child (mmdebstrap's
    own /proc, /sys and /dev in its target) mounted without kiln's journal knowing."""
    found = sorted(_mounted_under(path), key=lambda t: t.count("/"), reverse=True)
    for t in found:
        _umount(t)
    return found


def reclaim(journal_dir: Path) -> list[str]:
    """Unmount what a dead build's journal lists (deepest first); returns what was unmounted."""
    journal = journal_dir / JOURNAL
    if not journal.exists():
        return []
    try:
        targets: list[str] = json.loads(journal.read_text())
    except ValueError:
        targets = []
    done = []
    live = mounted_targets()
    for t in sorted(targets, key=lambda p: p.count("/"), reverse=True):
        if t in live:
            _umount(t)
            done.append(t)
    journal.unlink(missing_ok=True)
    return done


BINFMT_MISC = Path("/proc/sys/fs/binfmt_misc")


def ensure_binfmt_misc() -> Path:
    """The kernel's binfmt_misc file system, mounted if it is not (a host facility, left mounted as the
    distribution's own init would leave it; it is not part of any build)."""
    if not (BINFMT_MISC / "register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_MISC)], quiet=True,
            what="mount binfmt_misc")
    return BINFMT_MISC


def _remove_on_one_file_system(path: Path) -> list[str]:
    """Delete `path` without ever entering a directory on another file system than `path`'s own (st_dev),
    whatever the mount table says, nor following a symlink; returns the directories it left for that."""
    top = os.lstat(path)
    if not stat.S_ISDIR(top.st_mode):
        os.unlink(path)
        return []
    crossed: list[str] = []
    emptied: list[str] = []
    for root, dirs, files, root_fd in os.fwalk(path, topdown=True, follow_symlinks=False):
        for name in files:
            with contextlib.suppress(OSError):  # gone already, or undeletable: reported by what is left
                os.unlink(name, dir_fd=root_fd)
        keep = []
        for name in dirs:
            try:
                st = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=root_fd)
            elif st.st_dev != top.st_dev:
                crossed.append(os.path.join(root, name))
            else:
                keep.append(name)
        dirs[:] = keep
        emptied.append(root)
    blocked = {os.path.dirname(c) for c in crossed}
    for directory in reversed(emptied):  # deepest first
        if any(b == directory or b.startswith(directory + "/") for b in blocked):
            continue
        try:
            os.rmdir(directory)
        except OSError as exc:  # as shutil.rmtree(ignore_errors=True) did: what stays is logged, not fatal
            if not isinstance(exc, FileNotFoundError):
                log.warning("could not remove %s: %s", directory, exc.strerror)
    return crossed


def remove_tree(path: Path) -> None:
    """Delete a build's directory, but never through a mount point: a bind of the host's /dev left in a
    root tree would otherwise have its device nodes deleted. Unmounts what is below first; refuses if
    anything stays mounted."""

    if not path.exists():
        return
    unmount_under(path)
    left = _mounted_under(path)
    if left:
        raise MountError(f"not removing {path}: still mounted below it: {', '.join(sorted(left))}")
    crossed = _remove_on_one_file_system(path)
    if crossed:
        raise MountError(f"not removing {path} entirely: {', '.join(crossed)} lie on another file system "
                         "(a mount the mount table did not show); left in place")
