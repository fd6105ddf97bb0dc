"""Local QEMU boot tests, and the probe that decides between KVM and TCG.

A boot test boots a throw-away overlay of an image with a NoCloud seed and watches the serial console
for the seed's marker and cloud-init's "finished" line. QEMU runs through `kiln.run.run` in the
calling thread (its own process group, registered for `terminate_all`, killed on timeout or
exception, and started under `setpriv --pdeathsig KILL` so that even a SIGKILLed kiln takes it along);
the serial console is a unix socket that a helper thread reads, logs and, for the optional login check,
types into; it stops QEMU once the verdict is in. QEMU itself writes the complete console to
`serial-<firmware>.log`.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kiln.errors import BootTestError, CommandError
from kiln.run import output, run
from kiln.seed import DISK_BYTES_PREFIX, ROOT_BYTES_PREFIX

log = logging.getLogger("kiln.qemu")

ACCELS = ("kvm", "tcg")
FIRMWARES = ("bios", "uefi")
ARCHES = ("amd64", "arm64")
QEMU_BINARY = {"amd64": "qemu-system-x86_64", "arm64": "qemu-system-aarch64"}
UEFI_FILES = {
    "amd64": (Path("/usr/share/OVMF/OVMF_CODE.fd"), Path("/usr/share/OVMF/OVMF_VARS.fd")),
    "arm64": (Path("/usr/share/AAVMF/AAVMF_CODE.fd"), Path("/usr/share/AAVMF/AAVMF_VARS.fd")),
}
PROBE_TIMEOUT = 15.0
PROBE_CACHE = "accel-probe.json"
SERIAL_TAIL_LINES = 40
DEFAULT_GROW_MIB = 1024

FINISHED_RE = re.compile(r"Cloud-init v\. \S+ finished")
_ROOT_RE = re.compile(re.escape(ROOT_BYTES_PREFIX) + r"(\d+)")
_DISK_RE = re.compile(re.escape(DISK_BYTES_PREFIX) + r"(\d+)")
_ANSI_RE = re.compile(r"\x1b\[[0-9;?=]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[0-~]")
_CTRL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# console lines after which the guest will never reach cloud-init's end: fail at once, not at timeout
FATAL_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"No bootable device"), "the firmware found no bootable device"),
    (re.compile(r"BdsDxe: No bootable option"), "the firmware found no bootable device"),
    (re.compile(r"\"EFI Internal Shell\""), "UEFI found nothing to boot and fell back to its shell"),
    (re.compile(r"Entering rescue mode|grub rescue>"), "GRUB dropped to its rescue shell"),
    (re.compile(r"Kernel panic - not syncing"), "the kernel panicked"),
    (re.compile(r"Dropping to a shell|\(initramfs\)"), "the initramfs gave up (root device not found?)"),
    (re.compile(r"You are in emergency mode"), "systemd entered emergency mode"),
)
# QEMU's own chatter that says nothing about a failure
_QEMU_NOISE_RE = re.compile(r"QEMU waiting for connection|terminating on signal")
# how long to wait for the marker once cloud-init says it finished (console output can interleave)
MARKER_GRACE = 5.0

_LOGIN_RE = re.compile(r"login:\s*$")
_PASSWORD_RE = re.compile(r"[Pp]assword:\s*$")
_SHELL_OR_FAIL_RE = re.compile(r"Login incorrect|[#$]\s*$")
_LOGIN_PROOF_RE = re.compile(r"KILN-LOGIN-42")
LOGIN_COMMAND = "echo KILN-LOGIN-$((40+2))"


@dataclass(frozen=True)
class BootResult:
    """What a boot test saw. `seconds` runs from QEMU's start to cloud-init's end."""

    firmware: str
    accel: str
    seconds: float
    passed: bool
    root_bytes: int | None
    disk_bytes: int | None
    login_ok: bool | None  # None when no login was asked for
    serial_log: Path

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for manifest.json)."""
        data = asdict(self)
        data["serial_log"] = str(self.serial_log)
        return data


def clean_console(text: str) -> str:
    """Drop ANSI escapes, carriage returns and other control characters from console text."""
    return _CTRL_RE.sub("", _ANSI_RE.sub("", text))


@dataclass
class SerialFacts:
    """What the boot test looks for on the console, fed one cleaned line at a time."""

    marker: str
    marker_seen: bool = False
    finished_seen: bool = False
    root_bytes: int | None = None
    disk_bytes: int | None = None
    fatal: str | None = None
    fatal_line: str | None = None

    @property
    def passed(self) -> bool:
        return self.marker_seen and self.finished_seen

    def feed(self, line: str) -> None:
        """Take one console line (already cleaned)."""
        if self.marker in line:
            self.marker_seen = True
        if FINISHED_RE.search(line):
            self.finished_seen = True
        if m := _ROOT_RE.search(line):
            self.root_bytes = int(m.group(1))
        if m := _DISK_RE.search(line):
            self.disk_bytes = int(m.group(1))
        if self.fatal is None and not self.passed:
            for pattern, reason in FATAL_PATTERNS:
                if pattern.search(line):
                    self.fatal, self.fatal_line = reason, line.strip()
                    break

    @classmethod
    def parse(cls, text: str, marker: str) -> SerialFacts:
        """Scan a whole serial log."""
        facts = cls(marker)
        for line in text.splitlines():
            facts.feed(clean_console(line))
        return facts


def serial_tail(path: Path, lines: int = SERIAL_TAIL_LINES) -> list[str]:
    """The last `lines` non-blank lines of a serial log, cleaned of escapes."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            data = f.read()
    except FileNotFoundError:
        return []
    # OVMF redraws with bare carriage returns: treat them as line breaks too
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    cleaned = [clean_console(line).rstrip() for line in text.split("\n")]
    return [line for line in cleaned if line.strip()][-lines:]


# ----------------------------------------------------------------------------------------------- argv


def with_parent_death_signal(argv: list[str]) -> list[str]:
    """Prefix `setpriv --pdeathsig KILL` when available, so QEMU dies even if kiln is SIGKILLed."""
    return ["setpriv", "--pdeathsig", "KILL", *argv] if shutil.which("setpriv") else argv


def host_arch() -> str:
    """The host's architecture in Debian's naming."""
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)


def _opt(path: Path | str) -> str:
    """A path as a QEMU option value (commas are doubled)."""
    return str(path).replace(",", ",,")


def accel_args(accel: str) -> list[str]:
    """QEMU flags for an accelerator."""
    if accel == "kvm":
        return ["-enable-kvm", "-cpu", "host"]
    if accel == "tcg":
        return ["-accel", "tcg,thread=multi", "-cpu", "max"]
    raise ValueError(f"unknown accelerator {accel!r} (expected one of {', '.join(ACCELS)})")


def qemu_argv(
    *,
    arch: str,
    firmware: str,
    accel: str,
    disk: Path,
    seed_iso: Path | None,
    serial_socket: Path,
    serial_log: Path,
    memory_mib: int = 1024,
    cpus: int = 2,
    firmware_code: Path | None = None,
    firmware_vars: Path | None = None,
    name: str = "kiln-boot-test",
) -> list[str]:
    """The QEMU command line of a boot test (pure: touches no file).

    `disk` is a qcow2 overlay; `firmware_code`/`firmware_vars` are the UEFI code (read-only) and a
    private copy of the variable store, required for `uefi`.
    """
    if arch not in QEMU_BINARY:
        raise ValueError(f"unknown arch {arch!r} (expected one of {', '.join(ARCHES)})")
    if firmware not in FIRMWARES:
        raise ValueError(f"unknown firmware {firmware!r} (expected one of {', '.join(FIRMWARES)})")
    if arch == "arm64" and firmware != "uefi":
        raise ValueError("arm64 boots with UEFI only")
    argv = [QEMU_BINARY[arch], "-name", name]
    argv += ["-machine", "q35" if arch == "amd64" else "virt"]
    argv += accel_args(accel)
    # -nographic (with the serial and monitor redirected below) is what makes SeaBIOS print on serial
    argv += ["-m", str(memory_mib), "-smp", str(cpus), "-nodefaults", "-nographic", "-monitor", "none",
             "-no-reboot", "-boot", "strict=on"]
    if firmware == "uefi":
        if firmware_code is None or firmware_vars is None:
            raise ValueError("uefi needs firmware_code and firmware_vars")
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_opt(firmware_code)}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={_opt(firmware_vars)}"]
    argv += ["-drive", f"file={_opt(disk)},if=none,id=disk0,format=qcow2,cache=unsafe,discard=unmap",
             "-device", "virtio-blk-pci,drive=disk0,bootindex=0"]
    if seed_iso is not None:
        argv += ["-drive", f"file={_opt(seed_iso)},if=none,id=seed0,format=raw,readonly=on",
                 "-device", "virtio-blk-pci,drive=seed0"]
    # no option ROM: neither SeaBIOS nor OVMF wastes time trying to boot from the network
    # restrict=on: the guest gets DHCP and nothing beyond; it cannot reach the host's loopback (10.0.2.2), where
    # the Prefect API, the S3 server and the OpenStack services listen, nor anything else
    argv += ["-netdev", "user,id=net0,restrict=on", "-device", "virtio-net-pci,netdev=net0,romfile="]
    argv += ["-device", "virtio-rng-pci"]
    argv += ["-chardev", f"socket,id=serial0,path={_opt(serial_socket)},server=on,wait=on,"
                         f"logfile={_opt(serial_log)},logappend=off",
             "-serial", "chardev:serial0"]
    return argv


def probe_argv(kernel: Path, arch: str | None = None, accel: str = "kvm") -> list[str]:
    """The QEMU command line of the KVM probe: a direct kernel boot that panics without a root."""
    arch = arch or host_arch()
    console = "ttyS0" if arch == "amd64" else "ttyAMA0"
    return [QEMU_BINARY[arch], "-machine", "q35" if arch == "amd64" else "virt", *accel_args(accel),
            "-m", "256", "-smp", "1", "-nodefaults", "-nographic", "-monitor", "none", "-serial", "stdio",
            "-no-reboot", "-kernel", str(kernel),
            "-append", f"console={console} panic=-1 rdinit=/nonexistent"]


# ---------------------------------------------------------------------------------------------- probe


class _ProbeDone(Exception):
    """Raised from the probe's line callback to stop QEMU as soon as the verdict is known."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def qemu_version(binary: str) -> str:
    """First line of `qemu-system-* --version`."""
    return output([binary, "--version"]).splitlines()[0].strip()


def _probe_kvm(kernel: Path, timeout: float, accel: str = "kvm") -> tuple[bool, str]:
    """Boot `kernel` under KVM; True when it prints past decompression to its panic within `timeout`.

    (`accel` is there so tests can check the verdict logic under TCG.)
    """
    seen: dict[str, bool] = {"version": False, "later": False}

    def on_line(line: str) -> None:
        if "Linux version" in line:
            seen["version"] = True
        elif seen["version"] and ("Kernel panic" in line or "Run /" in line or "VFS:" in line):
            seen["later"] = True
            raise _ProbeDone

    start = time.monotonic()
    try:
        done = run(with_parent_death_signal(probe_argv(kernel, accel=accel)), timeout=timeout, check=False,
                   quiet=True, on_line=on_line, what="KVM probe")
        detail = f"QEMU exited with code {done.returncode}"
    except _ProbeDone:
        detail = "the kernel ran to its panic"
    except CommandError as exc:
        detail = f"no verdict within {timeout:.0f} s" if exc.returncode is None else str(exc).splitlines()[0]
    took = time.monotonic() - start
    ok = seen["version"] and seen["later"]
    if not ok and seen["version"]:
        detail += "; the kernel started but stalled"
    elif not ok:
        detail += "; the kernel printed nothing"
    return ok, f"{detail} ({took:.1f} s)"


def _kvm_possible(binary: str) -> bool:
    return shutil.which(binary) is not None and os.access("/dev/kvm", os.R_OK | os.W_OK)


def probe_accel(kernel: Path | None, *, state_dir: Path | None = None, timeout: float = PROBE_TIMEOUT) -> str:
    """"kvm" if KVM really runs a guest on this host, else "tcg"; env KILN_ACCEL=kvm|tcg overrides.

    /dev/kvm opening is no proof (nested guests hang after the kernel decompresses), so `kernel` (one
    for the host's architecture) is booted under KVM with a deadline. Verdicts are cached in
    `state_dir/accel-probe.json`, keyed by the kernel's sha256, the QEMU version and the host kernel.
    """
    forced = os.environ.get("KILN_ACCEL", "").strip().lower()
    if forced:
        if forced not in ACCELS:
            raise ValueError(f"KILN_ACCEL={forced!r}: expected one of {', '.join(ACCELS)}")
        log.info("accelerator %s (from KILN_ACCEL)", forced)
        return forced
    if kernel is None:
        return "tcg"
    binary = QEMU_BINARY.get(host_arch())
    if binary is None or not _kvm_possible(binary):
        log.info("accelerator tcg: no /dev/kvm or no %s", binary or f"QEMU for {host_arch()}")
        return "tcg"
    key = f"{_sha256(Path(kernel))} {qemu_version(binary)} host={platform.release()}"
    cache_file = Path(state_dir) / PROBE_CACHE if state_dir is not None else None
    cache: dict[str, Any] = {}
    if cache_file is not None:
        try:
            cache = json.loads(cache_file.read_text())
        except (FileNotFoundError, ValueError):
            cache = {}
        entry = cache.get(key)
        if isinstance(entry, dict) and entry.get("accel") in ACCELS:
            log.info("accelerator %s (cached probe: %s)", entry["accel"], entry.get("detail", ""))
            return str(entry["accel"])
    ok, detail = _probe_kvm(Path(kernel), timeout)
    accel = "kvm" if ok else "tcg"
    log.info("accelerator %s (KVM probe: %s)", accel, detail)
    if cache_file is not None:
        cache[key] = {"accel": accel, "detail": detail, "checked_at": time.time()}
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=2, sort_keys=True) + "\n")
        tmp.replace(cache_file)
    return accel


# -------------------------------------------------------------------------------------- serial console


@dataclass
class _Login:
    user: str
    password: str


@dataclass
class _ConsoleState:
    facts: SerialFacts
    passed_at: float | None = None
    login_ok: bool | None = None
    error: BaseException | None = None
    connected: bool = False


class _SerialConsole(threading.Thread):
    """Reads the guest's serial socket, watches for pass/fail, optionally logs in, then stops QEMU."""

    def __init__(self, path: Path, marker: str, *, login: _Login | None, deadline: float) -> None:
        super().__init__(name=f"kiln-serial-{path.parent.name}", daemon=True)
        self.path = path
        self.login = login
        self.deadline = deadline
        self.state = _ConsoleState(SerialFacts(marker))
        self.stopping = threading.Event()
        self._sock: socket.socket | None = None
        self._pidfd: int | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""
        self._window = ""  # cleaned text received since the last thing we typed
        self._eof = False

    # -- plumbing
    def _connect(self) -> bool:
        while not self.stopping.is_set():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                time.sleep(0.05)
                continue
            self._sock = sock
            sock.settimeout(0.5)
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid = struct.unpack("3i", creds)[0]
            # a pidfd names exactly this QEMU: no risk of signalling a recycled pid later
            with contextlib.suppress(OSError):
                self._pidfd = os.pidfd_open(pid)
            self.state.connected = True
            return True
        return False

    def _pump(self) -> bool:
        """Read what is there (up to 0.5 s); False once the socket is closed or we are told to stop."""
        if self._eof or self._sock is None or self.stopping.is_set():
            return False
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            return True
        except OSError:
            data = b""
        if not data:
            self._eof = True
            return False
        text = self._decoder.decode(data)
        self._window = (self._window + clean_console(text.replace("\r", "")))[-65536:]
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for raw in lines:
            line = clean_console(raw).rstrip()
            log.debug("serial: %s", line)
            self.state.facts.feed(line)
        return True

    def _send(self, text: str) -> None:
        assert self._sock is not None
        self._window = ""
        self._sock.sendall(text.encode())

    def _wait_for(self, pattern: re.Pattern[str], seconds: float) -> re.Match[str] | None:
        until = min(time.monotonic() + seconds, self.deadline)
        while True:
            # a prompt has no newline yet, so look at the raw window, not at whole lines
            if m := pattern.search(self._window):
                return m
            if time.monotonic() >= until or not self._pump():
                return None

    def _signal(self, sig: int) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self._pidfd, sig)

    # -- the script
    def run(self) -> None:
        try:
            self._script()
        except BaseException as exc:  # reported by boot_test; QEMU is stopped below or by its timeout
            self.state.error = exc
            log.debug("serial console reader failed", exc_info=True)
        finally:
            with contextlib.suppress(BaseException):
                self._stop_qemu()
            if self._sock is not None:
                self._sock.close()
            if self._pidfd is not None:
                os.close(self._pidfd)

    def _script(self) -> None:
        if not self._connect():
            return
        facts = self.state.facts
        finished_at: float | None = None
        while not facts.passed and facts.fatal is None:
            if not self._pump():
                return
            if facts.finished_seen and not facts.marker_seen:
                finished_at = finished_at or time.monotonic()
                if time.monotonic() - finished_at > MARKER_GRACE:
                    facts.fatal = "cloud-init finished but the marker never appeared (was the seed read?)"
        if facts.passed:
            self.state.passed_at = time.monotonic()
            log.info("serial console: marker and cloud-init's end seen")
            if self.login is not None:
                self.state.login_ok = self._do_login(self.login)
                log.info("serial console login as %s: %s", self.login.user,
                         "ok" if self.state.login_ok else "FAILED")

    def _do_login(self, login: _Login) -> bool:
        for _ in range(8):
            # the prompt may have scrolled away under cloud-init's output: an empty name redraws it
            self._send("\r")
            if self._wait_for(_LOGIN_RE, 15):
                break
            if self._eof or time.monotonic() >= self.deadline:
                return False
        else:
            return False
        self._send(login.user + "\r")
        if not self._wait_for(_PASSWORD_RE, 30):
            return False
        self._send(login.password + "\r")
        m = self._wait_for(_SHELL_OR_FAIL_RE, 120)
        if m is None or m.group(0).startswith("Login"):
            return False
        for _ in range(3):
            self._send(LOGIN_COMMAND + "\r")
            if self._wait_for(_LOGIN_PROOF_RE, 20):
                return True
        return False

    def _stop_qemu(self) -> None:
        if self._sock is None or self._eof or self.stopping.is_set():
            return
        self._signal(signal.SIGTERM)
        until = time.monotonic() + 10
        while time.monotonic() < until and self._pump():  # keep draining so QEMU never blocks on us
            pass
        if not self._eof:
            self._signal(signal.SIGKILL)


# ------------------------------------------------------------------------------------------ boot test


def _image_info(image: Path) -> tuple[str, int]:
    info = json.loads(output(["qemu-img", "info", "--output=json", str(image)]))
    return str(info["format"]), int(info["virtual-size"])


def _validate(firmware: str, arch: str, accel: str) -> None:
    if firmware not in FIRMWARES:
        raise ValueError(f"unknown firmware {firmware!r} (expected one of {', '.join(FIRMWARES)})")
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r} (expected one of {', '.join(ARCHES)})")
    if accel not in ACCELS:
        raise ValueError(f"unknown accelerator {accel!r} (expected one of {', '.join(ACCELS)})")


def boot_test(
    image: Path,
    *,
    firmware: str,
    arch: str = "amd64",
    marker: str,
    seed_iso: Path,
    workdir: Path,
    accel: str,
    memory_mib: int = 1024,
    cpus: int = 2,
    timeout: float,
    extra_login: tuple[str, str] | None = None,
    grow_mib: int = DEFAULT_GROW_MIB,
) -> BootResult:
    """Boot a throw-away overlay of `image` and wait for `marker` and cloud-init's end on the console.

    The image is never written. The overlay is `grow_mib` larger than the image so growroot has work
    to do. With `extra_login=(user, password)` it then logs in on the serial console and runs a
    command (`login_ok`). Raises BootTestError (firmware, reason, console tail) when the boot does not
    pass within `timeout` seconds. QEMU never outlives the call.
    """
    _validate(firmware, arch, accel)
    image = Path(image).resolve()
    workdir = Path(workdir)
    if accel == "kvm" and arch != host_arch():
        log.info("boot test %s/%s: KVM cannot run %s guests on this %s host, using TCG",
                 arch, firmware, arch, host_arch())
        accel = "tcg"
    binary = QEMU_BINARY[arch]
    if shutil.which(binary) is None:
        raise BootTestError(f"boot test ({arch}/{firmware}): {binary} is not installed")
    uefi: tuple[Path, Path] | None = None
    if firmware == "uefi":
        uefi = UEFI_FILES[arch]
        missing = [str(p) for p in uefi if not p.exists()]
        if missing:
            raise BootTestError(f"boot test ({arch}/{firmware}): UEFI firmware missing: {', '.join(missing)}")

    workdir.mkdir(parents=True, exist_ok=True)
    serial_log = workdir / f"serial-{firmware}.log"
    serial_log.unlink(missing_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".boot-{firmware}-", dir=workdir))
    # unix socket paths are limited to ~107 bytes: keep the socket out of a possibly deep workdir
    sockdir = Path(tempfile.mkdtemp(prefix="kiln-qemu-"))
    console: _SerialConsole | None = None
    try:
        fmt, size = _image_info(image)
        overlay = scratch / "overlay.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image), "-F", fmt, str(overlay),
             str(size + grow_mib * 1024 * 1024)], quiet=True, what="create the boot-test overlay")
        vars_copy: Path | None = None
        if uefi is not None:
            vars_copy = scratch / "efivars.fd"
            shutil.copyfile(uefi[1], vars_copy)
        argv = qemu_argv(arch=arch, firmware=firmware, accel=accel, disk=overlay,
                         seed_iso=Path(seed_iso).resolve(), serial_socket=sockdir / "serial.sock",
                         serial_log=serial_log.resolve(),
                         memory_mib=memory_mib, cpus=cpus, firmware_code=uefi[0] if uefi else None,
                         firmware_vars=vars_copy, name=f"kiln-boot-{firmware}")
        log.info("boot test %s/%s (%s) of %s, timeout %.0f s", arch, firmware, accel, image.name, timeout)
        start = time.monotonic()
        login = _Login(*extra_login) if extra_login else None
        console = _SerialConsole(sockdir / "serial.sock", marker, login=login, deadline=start + timeout)
        console.start()
        returncode: int | None = None
        qemu_out: list[str] = []
        reason: str | None = None
        try:
            done = run(with_parent_death_signal(argv), timeout=timeout, check=False, quiet=True,
                       what=f"QEMU ({firmware})")
            returncode, qemu_out = done.returncode, done.lines
        except CommandError as exc:
            qemu_out, reason = exc.tail, str(exc).splitlines()[0]  # timed out, or could not start
        console.stopping.set()
        console.join(timeout=15)
        state = console.state
        facts = state.facts
        if facts.passed and state.passed_at is not None:
            result = BootResult(firmware=firmware, accel=accel, seconds=round(state.passed_at - start, 1),
                                passed=True, root_bytes=facts.root_bytes, disk_bytes=facts.disk_bytes,
                                login_ok=state.login_ok, serial_log=serial_log)
            log.info("boot test %s/%s passed in %.0f s (root %s bytes, disk %s bytes%s)", arch, firmware,
                     result.seconds, result.root_bytes, result.disk_bytes,
                     "" if result.login_ok is None else f", login {'ok' if result.login_ok else 'FAILED'}")
            return result
        if facts.fatal is not None:
            reason = facts.fatal + (f" ({facts.fatal_line})" if facts.fatal_line else "")
        elif reason is None:
            reason = f"QEMU exited with code {returncode}" + (
                " (the guest powered off or reset)" if returncode == 0 else "")
        if not facts.fatal and facts.marker_seen != facts.finished_seen:
            reason += "; seen: " + ("the marker" if facts.marker_seen else "cloud-init's end, no marker")
        if state.error is not None:
            reason += f"; console reader error: {state.error!r}"
        raise BootTestError(_failure_message(arch, firmware, accel, image, reason, serial_log, qemu_out))
    finally:
        if console is not None and console.is_alive():
            console.stopping.set()
            console.join(timeout=15)
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(sockdir, ignore_errors=True)


def _failure_message(arch: str, firmware: str, accel: str, image: Path, reason: str, serial_log: Path,
                     qemu_out: list[str]) -> str:
    tail = serial_tail(serial_log)
    text = f"boot test {arch}/{firmware} ({accel}) of {image.name} failed: {reason}"
    said = [line for line in qemu_out if line.strip() and not _QEMU_NOISE_RE.search(line)]
    if said:
        text += "\n  QEMU said:\n" + "\n".join(f"    {line}" for line in said[-10:])
    text += f"\n  serial console ({serial_log}), last {len(tail)} lines:"
    text += ("\n" + "\n".join(f"    {line}" for line in tail)) if tail else " (empty)"
    return text

