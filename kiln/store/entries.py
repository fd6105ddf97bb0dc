"""The content-addressed store: root-filesystem layers and build artifacts, keyed by content hashes.

An entry is built in `tmp/` and renamed into `entries/` only when complete, so a crash never leaves
an entry that a later build trusts. A per-key `flock` makes two builds of the same key wait for each
other instead of building twice. `meta.json` of each entry records what it is; the mtime of its
`last-use` file is its last use, for LRU garbage collection.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from kiln.host.state import private_dir

log = logging.getLogger("kiln.store")

FAILED_BOOTS = "failed-boots"  # console logs of failed boot tests, kept for a look (tasks/boot_test.py)
FAILED_BOOTS_KEPT = 20
KEY_CHARS = 24  # 96 bits: short directory names keep deep overlay stacks under the mount-option limit


def default_root() -> Path:
    if os.environ.get("KILN_CACHE"):
        return Path(os.environ["KILN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "kiln"


@dataclass(frozen=True)
class StepEntry:
    """What `Store.step` yields: the entry's data directory, and whether it was already in the store."""

    key: str
    cached: bool
    data: Path
    scratch: Path | None  # the new entry's directory (data/ and room for scratch); None when cached


@dataclass(frozen=True)
class Entry:
    key: str
    kind: str
    description: str
    size: int
    created: float
    last_use: float
    path: Path


def fingerprint(path: Path) -> str:
    """A cheap fingerprint of an entry's content: every file's path, type, mode, size, mtime and link target.

    Any change made to an entry after it was written (a deleted, truncated, rewritten or added file) shows;
    reading every byte of a multi-GiB layer on every build would not pay.
    """
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames + dirnames):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            h.update(f"{os.path.relpath(full, path)}\0{st.st_mode:o}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(full).encode())
    return h.hexdigest()


def _du(path: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + dirnames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            total += st.st_blocks * 512
    return total


def _rmtree(path: Path) -> None:
    if path.exists() or path.is_symlink():
        shutil.rmtree(path, ignore_errors=False, onerror=lambda f, p, e: _force_remove(p))


def _force_remove(p: str) -> None:
    # overlayfs leaves its work directory with mode 000; make it removable and retry
    try:
        os.chmod(p, 0o700)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.unlink(p)
    except FileNotFoundError:
        pass


class Store:
    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_root()).resolve()
        self.entries_dir = self.root / "entries"
        self.tmp_dir = self.root / "tmp"
        self.locks_dir = self.root / "locks"
        self.work_root = self.root / "work"
        # 0700: entries hold stranger's trees (setuid binaries, device nodes) that no other user may reach
        private_dir(self.root)
        for d in (self.entries_dir, self.tmp_dir, self.locks_dir, self.work_root):
            d.mkdir(parents=True, exist_ok=True)
        self._verified: set[str] = set()

    @property
    def identity(self) -> str:
        """A random id this store got when it was created: records kept elsewhere about its entries (Prefect's
        cached results) name it, so that they never stand for another store, or for this path's next store."""
        path = self.root / "store-id"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            pass
        # named as a temporary entry of this process (NAME.PID.RANDOM), so clean_tmp leaves it alone
        tmp = self.tmp_dir / f"store-id.{os.getpid()}.{secrets.token_hex(4)}"
        tmp.write_text(secrets.token_hex(8) + "\n")
        try:
            os.link(tmp, path)  # the first writer wins; a concurrent one reads its id
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        return path.read_text().strip()

    @staticmethod
    def short(key: str) -> str:
        return key[:KEY_CHARS]

    def path(self, key: str) -> Path:
        """The entry's directory (its content lives in `data/`)."""
        return self.entries_dir / self.short(key)

    def data(self, key: str) -> Path:
        return self.path(key) / "data"

    def has(self, key: str) -> bool:
        meta = self.path(key) / "meta.json"
        if not meta.is_file():
            return False
        try:
            return bool(json.loads(meta.read_text()).get("key") == key)
        except ValueError:
            return False

    def valid(self, key: str) -> bool:
        """The entry exists and its content is what was written; a corrupted entry is removed (and so
        rebuilt by the caller). Checked once per process and entry."""
        if not self.has(key):
            return False
        if key in self._verified:
            return True
        expected = self.meta(key).get("fingerprint")
        if expected is not None and fingerprint(self.data(key)) != expected:
            log.warning("cache entry %s (%s) was changed after it was written; removing it to rebuild",
                        self.short(key), self.meta(key).get("description", "?"))
            self.remove(key)
            return False
        self._verified.add(key)
        return True

    def meta(self, key: str) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.path(key) / "meta.json").read_text())
        return data

    def touch(self, key: str) -> None:
        (self.path(key) / "last-use").touch()

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        with open(self.locks_dir / f"{self.short(key)}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @contextmanager
    def holding(self, keys: Sequence[str]) -> Iterator[None]:
        """Shared locks on the entries of `keys` for as long as the block uses them (an overlay of them is
        mounted): `gc` and `kiln cache gc` skip an entry in use, and a `--no-cache` rebuild of one waits.
        Lower layers are always ancestors of the entry a step writes, so holds never form a cycle."""
        with ExitStack() as stack:
            for key in dict.fromkeys(keys):
                fh = stack.enter_context(open(self.locks_dir / f"{self.short(key)}.lock", "a"))
                fcntl.flock(fh, fcntl.LOCK_SH)
            yield

    @contextmanager
    def _lock_if_free(self, key: str) -> Iterator[bool]:
        """The key's lock taken exclusively now (True), or False at once when a build holds it."""
        with open(self.locks_dir / f"{self.short(key)}.lock", "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True

    @contextmanager
    def step(self, key: str, *, kind: str, description: str, rebuild: bool = False, keep: tuple[str, ...] = (),
             extra: dict[str, object] | None = None) -> Iterator[StepEntry]:
        """The one lock -> check -> touch -> new entry sequence of a stage: under the key's lock, a valid
        entry is touched and yielded as cached (`data` is the entry's); otherwise a new entry is yielded
        (`data` is its empty data directory, `scratch` the directory around it) and committed when the
        block ends without an exception. `rebuild` ignores a valid entry."""
        with self.lock(key):
            if not rebuild and self.valid(key):
                self.touch(key)
                yield StepEntry(key, True, self.data(key), None)
                return
            with self.new_entry(key, kind=kind, description=description, keep=keep, extra=extra) as tmp:
                yield StepEntry(key, False, tmp / "data", tmp)

    @contextmanager
    def new_entry(self, key: str, *, kind: str, description: str, keep: tuple[str, ...] = (),
                  extra: dict[str, object] | None = None) -> Iterator[Path]:
        """Yield a fresh temporary directory; on success it becomes the entry for `key`.

        The caller writes the entry's content into the yielded directory's `data/` (created empty)
        and may use the rest of it as scratch (e.g. an overlay work directory); directories named in `keep`
        stay part of the entry. The caller must hold `lock(key)`.
        """
        tmp = self.tmp_dir / f"{self.short(key)}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        (tmp / "data").mkdir(parents=True)
        try:
            yield tmp
            for child in tmp.iterdir():
                if child.name != "data" and child.name not in keep:
                    _rmtree(child)
            meta = {"key": key, "kind": kind, "description": description, "created": time.time(),
                    "size": _du(tmp / "data"), "fingerprint": fingerprint(tmp / "data"), **(extra or {})}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            (tmp / "last-use").touch()
            final = self.path(key)
            if final.exists():
                _rmtree(final)  # a stale or corrupt entry under the same name
            os.rename(tmp, final)
        except BaseException:
            _rmtree(tmp)
            raise

    def remove(self, key: str) -> None:
        path = self.path(key)
        if path.exists():
            doomed = self.tmp_dir / f"{path.name}.removing.{uuid.uuid4().hex[:8]}"
            os.rename(path, doomed)  # atomic: nobody sees a half-removed entry
            _rmtree(doomed)

    def entries(self) -> list[Entry]:
        out = []
        for d in sorted(self.entries_dir.iterdir()):
            try:
                meta = json.loads((d / "meta.json").read_text())
                last_use = (d / "last-use").stat().st_mtime
            except (OSError, ValueError):
                continue
            out.append(Entry(key=meta["key"], kind=meta.get("kind", "?"), description=meta.get("description", ""),
                             size=int(meta.get("size", 0)), created=float(meta.get("created", 0)),
                             last_use=last_use, path=d))
        return out

    def clean_tmp(self, before_removing: Callable[[Path], object] | None = None) -> list[Path]:
        """Remove temporary entries no live process is building (left by a killed build); `before_removing`
        gets each one first (kiln gc unmounts what a killed bootstrap left mounted in it)."""
        removed = []
        for d in self.tmp_dir.iterdir():
            parts = d.name.split(".")
            pid = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None
            if pid is not None and pid != os.getpid() and _alive(pid):
                continue
            if pid == os.getpid():
                continue
            if before_removing is not None:
                before_removing(d)
            _rmtree(d)
            removed.append(d)
        return removed

    def gc(self, max_size: int) -> list[Entry]:
        """Remove least-recently-used entries until the store holds at most `max_size` bytes; an entry a build
        is using or making (its lock held) is skipped, never waited for."""
        entries = sorted(self.entries(), key=lambda e: e.last_use)
        total = sum(e.size for e in entries)
        removed = []
        for e in entries:
            if total <= max_size:
                break
            with self._lock_if_free(e.key) as free:
                if not free:
                    log.info("cache gc: %s is in use by a build: kept", e.description or e.key[:12])
                    continue
                self.remove(e.key)
            total -= e.size
            removed.append(e)
        self.trim_failed_boots()
        return removed

    def trim_failed_boots(self, keep: int = FAILED_BOOTS_KEPT) -> list[Path]:
        """The console logs of failed boot tests (`failed-boots/`, named in their errors): the newest `keep`
        stay, older ones go."""
        folder = self.root / FAILED_BOOTS
        if folder.is_symlink() or not folder.is_dir():
            return []
        dated: list[tuple[float, Path]] = []
        for p in folder.iterdir():
            with suppress(FileNotFoundError):  # a concurrent gc took it
                st = p.lstat()
                if stat.S_ISREG(st.st_mode):
                    dated.append((st.st_mtime, p))
        dated.sort(reverse=True)
        old = [p for _, p in dated[keep:]]
        for p in old:
            p.unlink(missing_ok=True)
            log.info("cache gc: removed the console log of an old failed boot: %s", p.name)
        return old


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


