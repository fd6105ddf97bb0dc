"""Running commands inside a root tree: the mounts a chroot needs, and their teardown.

The API file systems are mounted for the duration of one `ChrootSession`; /sys is read-only, /dev is a
small tmpfs of its own (null, zero, full, random, urandom, tty, a private devpts), never the host's, the
hooks directory is bound read-only at /tmp/in_target.d, the host's resolv.conf is made visible so that apt
can resolve the mirror, and a policy-rc.d keeps package scripts from starting services. Everything is
removed again on exit so that none of it ends up in a cached layer.

Every command runs in PID and mount namespaces of its own (`unshare`): its /proc shows only its own
processes, /proc/sys is read-only, and when it exits the kernel kills whatever it left running (a daemon a
package started), as diskimage-builder kills the processes whose root is the image's.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from kiln.host.mounts import MountStack
from kiln.host.run import Completed, run
from kiln.model.errors import MountError

log = logging.getLogger("kiln.chroot")

IN_TARGET = "/tmp/in_target.d"
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:" + IN_TARGET + "/bin"
POLICY_RC_D = "#!/bin/sh\n# kiln: no service starts during image builds\nexit 101\n"
# the chroot's /dev: (name, major, minor, mode), the character devices a package script may open
DEV_NODES = (("null", 1, 3, 0o666), ("zero", 1, 5, 0o666), ("full", 1, 7, 0o666), ("random", 1, 8, 0o666),
             ("urandom", 1, 9, 0o666), ("tty", 5, 0, 0o666))
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
             ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx"))
# run inside new PID and mount namespaces, before the chroot: /proc/sys read-only (the new /proc is mounted
# by unshare); "$0" is the root tree, the rest the command
_ENTER = '/usr/bin/mount --bind "$0/proc/sys" "$0/proc/sys" && ' \
         '/usr/bin/mount -o remount,bind,ro "$0/proc/sys" && exec /usr/sbin/chroot "$0" "$@"'



def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)

class ChrootSession:
    """The chroot's mounts and helper files, set up on enter and removed on exit."""

    def __init__(self, root: Path, journal_dir: Path, *, hooks_dir: Path | None = None,
                 apt_cache: Path | None = None) -> None:
        self.root = root
        self.hooks_dir = hooks_dir
        self.apt_cache = apt_cache
        self.journal_dir = journal_dir
        self.mounts = MountStack(journal_dir)
        self._created: list[Path] = []
        self._moved: list[tuple[Path, Path]] = []
        self._placed: dict[Path, bytes] = {}  # the temporary files kiln put in, with their contents

    def _mkdir(self, path: Path) -> None:
        missing = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        path.mkdir(parents=True, exist_ok=True)
        self._created.extend(reversed(missing))

    def _place_file(self, rel: str, content: bytes, mode: int) -> None:
        """Put a temporary file in the root, moving aside whatever is there (restored on exit, unless the
        hook replaced kiln's file with its own: a package making /etc/resolv.conf a link to its resolver's,
        say, which the image is to keep)."""
        target = self.root / rel.lstrip("/")
        if target.exists() or target.is_symlink():
            aside = target.with_name(target.name + ".kiln-aside")
            os.rename(target, aside)
            self._moved.append((aside, target))
        else:
            self._created.append(target)
        self._mkdir(target.parent)
        target.write_bytes(content)
        target.chmod(mode)
        self._placed[target] = content

    def _still_ours(self, target: Path) -> bool:
        """Whether `target` is still the file kiln placed (not replaced or rewritten by the hook)."""
        try:
            return (not target.is_symlink() and target.is_file()
                    and target.read_bytes() == self._placed.get(target))
        except OSError:
            return False

    def _refuse_symlinks(self) -> None:
        """Every path the session mounts on or writes to is resolved by the kernel from the host's root: a
        tree whose `dev`, `sys`, `etc` … is a symlink (`dev -> /dev`, `etc -> /etc`) would have kiln mount
        over, or move aside, the host's own. Refuse such a tree, naming the link."""
        rels = ["proc", "sys", "dev", "dev/pts", "etc/resolv.conf", "usr/sbin/policy-rc.d",
                IN_TARGET.lstrip("/")]
        if self.apt_cache is not None:
            rels.append("var/cache/apt/archives")
        for rel in rels:
            p = self.root
            for part in Path(rel).parts[:-1] if rel.endswith(("resolv.conf", "policy-rc.d")) else Path(rel).parts:
                p = p / part
                if p.is_symlink():
                    raise MountError(f"the root tree's /{p.relative_to(self.root)} is a symlink "
                                      f"(to {os.readlink(p)}): kiln mounts and writes there, so it must be a "
                                      "directory of the tree; refusing the tree")

    def __enter__(self) -> ChrootSession:
        self._refuse_symlinks()
        try:
            r = self.root
            for d in ("proc", "sys", "dev", "dev/pts"):
                self._mkdir(r / d)
            self.mounts.mount(["-t", "proc", "proc"], r / "proc", what="mount /proc in the chroot")
            self.mounts.mount(["-t", "sysfs", "-o", "ro", "sysfs"], r / "sys", what="mount /sys in the chroot")
            self._minimal_dev(r / "dev")
            self.mounts.mount(["-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=620", "devpts"],
                              r / "dev/pts", what="mount /dev/pts in the chroot")
            resolv = Path("/etc/resolv.conf")
            self._place_file("/etc/resolv.conf", resolv.read_bytes() if resolv.exists() else b"", 0o644)
            self._place_file("/usr/sbin/policy-rc.d", POLICY_RC_D.encode(), 0o755)
            if self.hooks_dir is not None:
                self._mkdir(r / IN_TARGET.lstrip("/"))
                self.mounts.bind(self.hooks_dir, r / IN_TARGET.lstrip("/"), readonly=True)
            if self.apt_cache is not None:
                archives = r / "var/cache/apt/archives"
                self._mkdir(archives)
                self.mounts.bind(self._private_archives(), archives)
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._teardown()

    def _minimal_dev(self, dev: Path) -> None:
        """A tmpfs at `dev` with the few device nodes package scripts use: none of the host's disks."""
        self.mounts.mount(["-t", "tmpfs", "-o", "mode=0755,nosuid,noexec,size=1m", "kiln-dev"], dev,
                          what="mount a minimal /dev in the chroot")
        for name, major, minor, mode in DEV_NODES:
            os.mknod(dev / name, stat.S_IFCHR | mode, os.makedev(major, minor))
            os.chmod(dev / name, mode)  # mknod's mode is masked by the umask
        for name, target in DEV_LINKS:
            os.symlink(target, dev / name)
        for d, mode in (("pts", 0o755), ("shm", 0o1777)):
            (dev / d).mkdir()
            os.chmod(dev / d, mode)

    def _private_archives(self) -> Path:
        """This build's own apt archives directory, filled with hard links to the shared .deb cache.

        apt locks its archives directory for a whole run, so builds of one arch sharing the directory
        itself would fail on each other's lock; sharing the .deb files by hard link does not."""
        assert self.apt_cache is not None
        private = self.journal_dir / "apt-archives"
        (private / "partial").mkdir(parents=True, exist_ok=True)
        self.apt_cache.mkdir(parents=True, exist_ok=True)
        _link_debs(self.apt_cache, private)
        return private

    def _teardown(self) -> None:
        try:
            self.mounts.unmount_all()
            if self.apt_cache is not None and (self.journal_dir / "apt-archives").is_dir():
                _link_debs(self.journal_dir / "apt-archives", self.apt_cache)  # share what this step downloaded
        finally:
            for path in reversed(self._created):
                if path in self._placed and not self._still_ours(path):
                    continue  # the hook made this file its own: it stays
                try:
                    if path.is_dir() and not path.is_symlink():
                        path.rmdir()
                    else:
                        path.unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.debug("left %s in place: %s", path, exc)
            self._created.clear()
            for aside, target in reversed(self._moved):
                if target in self._placed and not self._still_ours(target):
                    _remove(aside)  # the hook replaced kiln's file: its version is what the image keeps
                    continue
                if target.exists() or target.is_symlink():
                    target.unlink()
                os.rename(aside, target)
            self._moved.clear()
            self._placed.clear()

    def run(self, argv: Sequence[str], *, env: Mapping[str, str], timeout: float | None = None,
            what: str | None = None, check: bool = True, quiet: bool = False) -> Completed:
        """Run argv inside the chroot with exactly `env` (nothing of the host's environment; passed as the
        process environment, never on the command line where `ps` would show secrets), in PID and mount
        namespaces of its own: what it leaves running dies with it."""
        root = str(self.root)
        return run(["/usr/bin/unshare", "--pid", "--fork", "--kill-child", "--mount", "--propagation", "private",
                    f"--mount-proc={root}/proc", "--", "/bin/sh", "-c", _ENTER, root, *argv],
                   env=dict(env), timeout=timeout, what=what, check=check, quiet=quiet)


def _link_debs(src: Path, dest: Path) -> None:
    """Hard-link every .deb of `src` missing from `dest` (copy across file systems)."""
    have = {p.name for p in dest.glob("*.deb")}
    for deb in src.glob("*.deb"):
        if deb.name in have:
            continue
        try:
            os.link(deb, dest / deb.name)
        except FileExistsError:
            pass
        except OSError:
            shutil.copy2(deb, dest / deb.name)
