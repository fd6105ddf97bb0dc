"""Fixtures for the upstream-image tests, made here from scratch and served on 127.0.0.1 only.

`publish(root)` builds what a distribution publishes, at small scale: a root tree (os-release, a
symlink, a hard link, an xattr, a device node, a FIFO, odd owners and modes, a separate /boot and an
EFI system partition in the disk variant), packed as `root.tar.xz`, `root.squashfs` and `disk.qcow2`
(GPT; a FAT ESP, an ext4 /boot and an ext4 root, filled with `mkfs.fat`/`mcopy` and `mkfs.ext4 -d` at
their offsets, no mounting), a GNU-format `SHA256SUMS` with a detached signature, and a BSD-format
`CHECKSUM` clearsigned, both by a throwaway GPG key. A second throwaway key stands for an attacker.

`FixtureServer` serves a directory with Range/If-Range support and injectable faults: a body cut off
halfway once, HTTP statuses before the real answer; `dead_url()` names a port nobody listens on.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import socket
import stat
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kiln.host.run import output, run

MiB = 1 << 20
ROOT_UUID = "5b0c7a1e-8f3d-4c2a-9e6b-0d1f2a3b4c5d"
BOOT_UUID = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5e"
ESP_SERIAL = "1234ABCD"
# the disk: ESP 1-9 MiB, /boot 9-25 MiB, root 25 MiB to the end (the largest, so the one kiln picks)
DISK_SIZE = 96 * MiB
ESP = (1 * MiB, 8 * MiB)
BOOT = (9 * MiB, 16 * MiB)
ROOT_START = 25 * MiB
ROOT_SIZE = DISK_SIZE - ROOT_START - 1 * MiB

OS_RELEASE = 'PRETTY_NAME="Kiln Test Linux 1"\nNAME="Kiln Test Linux"\nID=kilntest\nVERSION_ID="1"\n'
FSTAB = (
    f"UUID={ROOT_UUID}\t/\text4\tdefaults\t0\t1\n"
    f"UUID={BOOT_UUID}\t/boot\text4\tdefaults\t0\t2\n"
    f"UUID={ESP_SERIAL[:4]}-{ESP_SERIAL[4:]}\t/boot/efi\tvfat\tumask=0077\t0\t1\n"
    "tmpfs\t/tmp\ttmpfs\tdefaults\t0\t0\n"
)


def _mtools_env() -> dict[str, str]:
    return {**os.environ, "MTOOLS_SKIP_CHECK": "1", "MTOOLSRC": "/dev/null", "LC_ALL": "C"}


def make_tree(full: Path) -> None:
    """The complete root tree an extraction must reproduce."""
    for d in ("etc", "usr/bin", "usr/lib", "dev", "run", "var/empty", "boot/grub", "boot/efi/EFI/BOOT"):
        (full / d).mkdir(parents=True, exist_ok=True)
    (full / "etc/os-release").write_text(OS_RELEASE)
    (full / "etc/fstab").write_text(FSTAB)
    (full / "etc/hostname").write_text("kilntest\n")
    hello = full / "usr/bin/hello"
    hello.write_bytes(b"#!/bin/sh\necho hello\n" + bytes(range(256)) * 64)
    hello.chmod(0o755)
    os.setxattr(hello, "user.kiln.test", b"xattr survives")
    os.link(hello, full / "usr/bin/hello-again")  # a hard link
    (full / "usr/bin/hi").symlink_to("hello")  # a relative symlink
    (full / "usr/lib/os-release").symlink_to("/etc/os-release")  # an absolute one
    suid = full / "usr/bin/suid"
    suid.write_text("setuid\n")
    suid.chmod(0o4755)
    owned = full / "etc/owned"
    owned.write_text("owned by 1234:5678\n")
    os.chown(owned, 1234, 5678)
    owned.chmod(0o640)
    (full / "tmp").mkdir()
    (full / "tmp").chmod(0o1777)
    os.mknod(full / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(full / "run/fifo", 0o600)
    (full / "boot/vmlinuz-1.0-test").write_bytes(b"not a kernel\n" * 100)
    (full / "boot/grub/grub.cfg").write_text("set timeout=1\n")
    (full / "boot/efi/EFI/BOOT/BOOTX64.EFI").write_bytes(b"MZ not an EFI binary\n")


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _sha512(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha512").hexdigest()


def make_disk(full: Path, work: Path, out: Path) -> None:
    """A qcow2 with GPT: ESP (FAT16, mtools), /boot (ext4 -d), root (ext4 -d); no mounts."""
    rootpart, bootpart, esp = work / "rootpart", work / "bootpart", work / "esp"
    run(["cp", "-a", f"{full}/.", f"{rootpart}/"], quiet=True)
    shutil.rmtree(rootpart / "boot")
    (rootpart / "boot").mkdir()
    shutil.copystat(full / "boot", rootpart / "boot")
    run(["cp", "-a", f"{full}/boot/.", f"{bootpart}/"], quiet=True)
    shutil.rmtree(bootpart / "efi")
    (bootpart / "efi").mkdir()
    run(["cp", "-a", f"{full}/boot/efi/.", f"{esp}/"], quiet=True)
    raw = work / "disk.raw"
    with open(raw, "wb") as fh:
        fh.truncate(DISK_SIZE)
    run(["sgdisk", "--clear",
         f"--new=1:{ESP[0] // 512}:{(ESP[0] + ESP[1]) // 512 - 1}", "--typecode=1:EF00", "--change-name=1:esp",
         f"--new=2:{BOOT[0] // 512}:{(BOOT[0] + BOOT[1]) // 512 - 1}", "--typecode=2:8300",
         f"--new=3:{ROOT_START // 512}:{(ROOT_START + ROOT_SIZE) // 512 - 1}", "--typecode=3:8300",
         str(raw)], quiet=True)
    run(["mkfs.fat", "-F", "16", "-S", "512", "-s", "1", f"--offset={ESP[0] // 512}", "-i", ESP_SERIAL, "-n", "ESP",
         str(raw), str(ESP[1] // 1024)], quiet=True)
    run(["mmd", "-i", f"{raw}@@{ESP[0]}", "::/EFI", "::/EFI/BOOT"], env=_mtools_env(), quiet=True)
    run(["mcopy", "-i", f"{raw}@@{ESP[0]}", "-m", str(esp / "EFI/BOOT/BOOTX64.EFI"), "::/EFI/BOOT/BOOTX64.EFI"],
        env=_mtools_env(), quiet=True)
    for (start, size), uuid, tree in ((BOOT, BOOT_UUID, bootpart), ((ROOT_START, ROOT_SIZE), ROOT_UUID, rootpart)):
        run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E", f"offset={start}", "-U", uuid, "-d", str(tree), str(raw),
             f"{size // 1024}k"], env={**os.environ, "LC_ALL": "C"}, quiet=True)
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)], quiet=True)
    raw.unlink()


@dataclass
class GpgKey:
    home: Path
    fingerprint: str
    keyring: Path  # binary export
    armored: Path  # ASCII-armored export

    def sign(self, src: Path, out: Path, *, clear: bool = False) -> None:
        mode = "--clearsign" if clear else "--detach-sign"
        run(["gpg", "--batch", "--yes", "--homedir", str(self.home), "--local-user", self.fingerprint,
             "--digest-algo", "SHA512", mode, "--output", str(out), str(src)], quiet=True)

    def stop(self) -> None:
        run(["gpgconf", "--homedir", str(self.home), "--kill", "gpg-agent"], check=False, quiet=True)


def make_key(home: Path, name: str) -> GpgKey:
    home.mkdir(mode=0o700, parents=True)
    run(["gpg", "--batch", "--homedir", str(home), "--passphrase", "", "--quick-gen-key",
         f"{name} <{name.replace(' ', '-')}@example.invalid>", "ed25519", "sign", "never"], quiet=True)
    listing = output(["gpg", "--batch", "--homedir", str(home), "--with-colons", "--list-keys"])
    fpr = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
    keyring = home.parent / f"{home.name}.gpg"
    armored = home.parent / f"{home.name}.asc"
    keyring.write_bytes(_gpg_export(home, armor=False))
    armored.write_bytes(_gpg_export(home, armor=True))
    return GpgKey(home, fpr, keyring, armored)


def _gpg_export(home: Path, *, armor: bool) -> bytes:
    out = home / ("export.asc" if armor else "export.gpg")
    run(["gpg", "--batch", "--homedir", str(home), "--output", str(out), *(["--armor"] if armor else []),
         "--export"], quiet=True)
    data = out.read_bytes()
    out.unlink()
    return data


@dataclass
class Published:
    """A distribution's publication directory, and what its files must unpack to."""

    root: Path  # the directory the server serves
    full: Path  # the expected root tree
    key: GpgKey  # the publisher's key
    attacker: GpgKey  # someone else's key
    files: dict[str, Path] = field(default_factory=dict)

    def case(self, name: str, *files: str) -> Path:
        """A fresh served subdirectory `name` with copies of `files` from `good/` (for per-test tampering)."""
        d = self.root / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        for f in files:
            shutil.copy2(self.root / "good" / f, d / f)
        return d


_published: Published | None = None


def publish(base: Path) -> Published:
    """Build the publication once per test session (about 2 s)."""
    global _published
    if _published is not None:
        return _published
    full = base / "full"
    make_tree(full)
    good = base / "served" / "good"
    good.mkdir(parents=True)
    run(["tar", "--create", "--xz", "--file", str(good / "root.tar.xz"), "--directory", str(full),
         "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "."], quiet=True)
    run(["tar", "--create", "--zstd", "--file", str(good / "root.tar.zst"), "--directory", str(full),
         "--numeric-owner", "--xattrs", "--xattrs-include=*", "."], quiet=True)
    run(["mksquashfs", str(full), str(good / "root.squashfs"), "-noappend", "-quiet", "-no-progress",
         "-comp", "gzip"], quiet=True)
    disk_work = base / "disk-work"
    disk_work.mkdir()
    make_disk(full, disk_work, good / "disk.qcow2")
    names = ["root.tar.xz", "root.tar.zst", "root.squashfs", "disk.qcow2"]
    (good / "SHA256SUMS").write_text(
        "".join(f"{_sha256(good / n)} {'*' if n.endswith('.xz') else ' '}{n}\n" for n in names)
    )
    (good / "CHECKSUM.plain").write_text(
        "# BSD format, as Fedora and Rocky write it\n"
        + "".join(f"# {n}: {(good / n).stat().st_size} bytes\nSHA512 ({n}) = {_sha512(good / n)}\n" for n in names)
    )
    key = make_key(base / "gnupg-publisher", "kiln test publisher")
    attacker = make_key(base / "gnupg-attacker", "kiln test attacker")
    key.sign(good / "SHA256SUMS", good / "SHA256SUMS.gpg")
    key.sign(good / "CHECKSUM.plain", good / "CHECKSUM", clear=True)
    (good / "CHECKSUM.plain").unlink()
    key.stop()
    attacker.stop()
    _published = Published(root=good.parent, full=full, key=key, attacker=attacker,
                           files={n: good / n for n in [*names, "SHA256SUMS", "SHA256SUMS.gpg", "CHECKSUM"]})
    return _published


# --------------------------------------------------------------------------------------------------
# the server


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    status: int


class FixtureServer:
    """A threaded HTTP server on 127.0.0.1 serving `root`, with Range support and injectable faults."""

    def __init__(self, root: Path, host: str = "127.0.0.1") -> None:
        self.root = root
        self.host = host
        self.requests: list[Seen] = []
        self.truncate_once: set[str] = set()  # paths whose next body stops halfway
        self.statuses: dict[str, list[int]] = {}  # paths -> statuses to answer before the file
        self.redirects: dict[str, str] = {}  # paths -> the path a 302 sends the client to
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server._handle(self)

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # the cut-off responses end in broken pipes on purpose

        self.httpd = Server((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="fixture-http", daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}/{path.lstrip('/')}"

    def seen(self, path: str) -> list[Seen]:
        return [r for r in self.requests if r.path == "/" + path.lstrip("/")]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(h.path).path)
        headers = {k.lower(): v for k, v in h.headers.items()}
        with self.lock:
            queued = self.statuses.get(path)
            status = queued.pop(0) if queued else None
            truncate = path in self.truncate_once
            self.truncate_once.discard(path)
        if path in self.redirects:
            self.requests.append(Seen(path, headers, 302))
            h.send_response(302)
            h.send_header("Location", self.url(self.redirects[path]))
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        file = (self.root / path.lstrip("/")).resolve()
        if status is None and (not file.is_relative_to(self.root.resolve()) or not file.is_file()):
            status = 404
        if status is not None:
            self.requests.append(Seen(path, headers, status))
            body = f"{status}\n".encode()
            h.send_response(status)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        data = file.read_bytes()
        st = file.stat()
        etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
        start = 0
        ranged = headers.get("range", "")
        if ranged.startswith("bytes=") and headers.get("if-range", etag) == etag:
            first, _, last = ranged[len("bytes="):].partition("-")
            start = int(first)
            end = int(last) + 1 if last else len(data)
            if start >= len(data):
                self.requests.append(Seen(path, headers, 416))
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            body = data[start:end]
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            code = 206
        else:
            body = data
            h.send_response(200)
            code = 200
        self.requests.append(Seen(path, headers, code))
        h.send_header("Content-Length", str(len(body)))
        h.send_header("ETag", etag)
        h.send_header("Accept-Ranges", "bytes")
        h.end_headers()
        if truncate:
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.wfile.write(body)


def dead_url(path: str = "dead/file") -> str:
    """A URL on 127.0.0.1 where nothing listens: connections are refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{path}"


# --------------------------------------------------------------------------------------------------
# comparing trees


def snapshot(root: Path, *, skip: tuple[str, ...] = (), content_only: tuple[str, ...] = ()) -> dict[str, Any]:
    """Everything kiln must preserve, per path: type, mode, owner, content, link target, device, xattrs,
    plus the hard-link groups. Paths under `content_only` (a FAT filesystem) keep type and content only."""
    entries: dict[str, Any] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if rel in skip or any(rel.startswith(s + "/") for s in skip):
                continue
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            info: dict[str, Any] = {"type": kind}
            if stat.S_ISREG(kind):
                info["sha256"] = _sha256(path)
                if st.st_nlink > 1:
                    inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            if stat.S_ISLNK(kind):
                info["target"] = os.readlink(path)
            if not any(rel == c or rel.startswith(c + "/") for c in content_only):
                info.update(mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)
                if stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                    info["rdev"] = st.st_rdev
                if stat.S_ISREG(kind) or stat.S_ISDIR(kind):
                    info["xattrs"] = {x: os.getxattr(path, x, follow_symlinks=False)
                                      for x in sorted(os.listxattr(path, follow_symlinks=False))}
            entries[rel] = info
    entries["<hardlinks>"] = sorted(sorted(group) for group in inodes.values())
    return entries


def mounts_and_loops(under: Path) -> list[str]:
    """Mounts (`findmnt`) and loop devices (`losetup -a`) that involve paths under `under`.

    Only those: other processes on the machine (another build, another test run) mount things too.
    """
    lines = output(["findmnt", "-rn", "-o", "TARGET,SOURCE"]).splitlines() + output(["losetup", "-a"]).splitlines()
    return [line for line in lines if str(under) in line]


# ---------------------------------------------------------------------------------------------- fixtures
# shared by the upstream test modules (imported into tests/conftest.py)


@pytest.fixture(scope="session")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    return publish(tmp_path_factory.mktemp("upstream"))


@pytest.fixture(scope="module")
def server(published: Published) -> Iterator[FixtureServer]:
    srv = FixtureServer(published.root)
    yield srv
    srv.close()
