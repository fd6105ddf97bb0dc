"""The boot test's serial console: what it looks for on the guest's console, and the thread that reads it.

The console is a unix socket QEMU serves; `SerialConsole` reads it (logging every cleaned line), watches
for the boot test's marker and cloud-init's end or a fatal line, optionally logs in as root on the console
and over SSH (kiln.boot.guest_ssh, from another thread while it keeps draining), then stops QEMU through a
pidfd of exactly that process.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import os
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kiln.boot import guest_agent, guest_ssh, qmp
from kiln.boot.conformance import REBOOT_LINE, Reports
from kiln.boot.seed import DISK_BYTES_PREFIX, FAILED_UNITS_PREFIX, ROOT_BYTES_PREFIX
from kiln.host.run import redact
from kiln.model.errors import BootTestError

log = logging.getLogger("kiln.qemu")
SERIAL_TAIL_LINES = 40

FINISHED_RE = re.compile(r"Cloud-init v\. \S+ finished")
_ROOT_RE = re.compile(re.escape(ROOT_BYTES_PREFIX) + r"(\d+)")
_DISK_RE = re.compile(re.escape(DISK_BYTES_PREFIX) + r"(\d+)")
_FAILED_RE = re.compile(re.escape(FAILED_UNITS_PREFIX) + r"([\w@.,:\\-]*)")
_ANSI_RE = re.compile(r"\x1b\[[0-9;?=]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[0-~]")
_CTRL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# what a guest may print in all (QEMU writes it to the serial log on disk too): a boot prints a few hundred KiB;
# a guest flooding its console is failed and stopped, not read (and logged) for the whole timeout
MAX_CONSOLE_BYTES = 64 * 1024 * 1024
STALL_SECONDS = 150  # silence on the console after the guest's reboot that means the firmware stalled
MAX_LINE_CHARS = 64 * 1024  # a "line" that never ends is cut here
# console lines after which the guest will never reach cloud-init's end: fail at once, not at timeout
FATAL_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"No bootable device"), "the firmware found no bootable device"),
    (re.compile(r"BdsDxe: failed to load .*Access Denied"),
     "Secure Boot refused the boot loader's signature (an image without the distribution's signed shim chain?)"),
    (re.compile(r"BdsDxe: No bootable option"), "the firmware found no bootable device"),
    (re.compile(r"\"EFI Internal Shell\""), "UEFI found nothing to boot and fell back to its shell"),
    (re.compile(r"Entering rescue mode|grub rescue>"), "GRUB dropped to its rescue shell"),
    (re.compile(r"Kernel panic - not syncing"), "the kernel panicked"),
    (re.compile(r"Dropping to a shell|\(initramfs\)"), "the initramfs gave up (root device not found?)"),
    (re.compile(r"You are in emergency mode"), "systemd entered emergency mode"),
)
# how long to wait for the marker once cloud-init says it finished (console output can interleave)
MARKER_GRACE = 5.0

_LOGIN_RE = re.compile(r"login:\s*$")
_PASSWORD_RE = re.compile(r"[Pp]assword:\s*$")
_SHELL_OR_FAIL_RE = re.compile(r"Login incorrect|[#$]\s*$")
_LOGIN_PROOF_RE = re.compile(r"KILN-LOGIN-42")
LOGIN_COMMAND = "echo KILN-LOGIN-$((40+2))"


def clean_console(text: str) -> str:
    """Drop ANSI escapes, carriage returns and other control characters from console text."""
    return _CTRL_RE.sub("", _ANSI_RE.sub("", text))


# the criteria a boot passes by: cloud-init's end after the seed's marker, or (for an image without
# cloud-init, which would never read the seed) systemd reaching its multi-user target and a login prompt
CRITERIA = ("cloud-init", "systemd")
MULTI_USER_RE = re.compile(r"Reached target .*(Multi-User System|multi-user\.target)")


@dataclass
class SerialFacts:
    """What the boot test looks for on the console, fed one cleaned line at a time."""

    marker: str
    criterion: str = "cloud-init"
    multi_user_seen: bool = False
    login_prompt_seen: bool = False
    marker_seen: bool = False
    finished_seen: bool = False
    root_bytes: int | None = None
    failed_units: list[str] | None = None  # None: not reported (no cloud-init, or an older seed)
    disk_bytes: int | None = None
    fatal: str | None = None
    fatal_line: str | None = None
    reports: Reports = field(default_factory=Reports)  # the conformance suite's lines
    rebooting: bool = False  # past the first boot: a fatal line fails the boot test again
    reboot_seen: bool = False  # the guest said it reboots now

    @property
    def passed(self) -> bool:
        if self.criterion == "systemd":
            return self.multi_user_seen and self.login_prompt_seen
        return self.marker_seen and self.finished_seen

    @property
    def describe(self) -> str:
        if self.criterion == "systemd":
            return "systemd's multi-user target and a login prompt (the image has no cloud-init)"
        return "the seed's marker and cloud-init's end"

    def feed(self, line: str) -> None:
        """Take one console line (already cleaned)."""
        if self.marker in line:
            self.marker_seen = True
        if FINISHED_RE.search(line):
            self.finished_seen = True
        if MULTI_USER_RE.search(line):
            self.multi_user_seen = True
        if m := _ROOT_RE.search(line):
            self.root_bytes = int(m.group(1))
        if m := _DISK_RE.search(line):
            self.disk_bytes = int(m.group(1))
        if m := _FAILED_RE.search(line):
            self.failed_units = [u for u in m.group(1).split(",") if u]
        self.reports.feed(line)
        if REBOOT_LINE in line:
            self.reboot_seen = True
        if self.fatal is None and (not self.passed or self.rebooting):
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


# -------------------------------------------------------------------------------------- serial console


def _connect_unix(path: Path, *, seconds: float) -> socket.socket:
    """A connection to QEMU's unix socket at `path`, which may not be listening yet."""
    until = time.monotonic() + seconds
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() >= until:
                raise
            time.sleep(0.05)


@dataclass
class Login:
    user: str
    password: str


@dataclass
class _ConsoleState:
    facts: SerialFacts
    passed_at: float | None = None
    login_ok: bool | None = None
    ssh_ok: bool | None = None
    agent: str | None = None  # the guest agent's guest-ping: "" answered, else what went wrong; None: not asked
    error: BaseException | None = None
    connected: bool = False


class SerialConsole(threading.Thread):
    """Reads the guest's serial socket, watches for pass/fail, optionally logs in, then stops QEMU."""

    def __init__(self, path: Path, marker: str, *, login: Login | None, deadline: float,
                 ssh_port: int | None = None, criterion: str = "cloud-init",
                 on_line: Callable[[str], None] | None = None, suite_boots: int = 0,
                 agent_socket: Path | None = None, control_socket: Path | None = None,
                 qmp_socket: Path | None = None) -> None:
        super().__init__(name=f"kiln-serial-{path.parent.name}", daemon=True)
        self.path = path
        self.login = login
        self.ssh_port = ssh_port
        self.deadline = deadline
        self.state = _ConsoleState(SerialFacts(marker, criterion=criterion))
        self.stopping = threading.Event()
        self._sock: socket.socket | None = None
        self._pidfd: int | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""
        self._received = 0  # bytes read from the console (MAX_CONSOLE_BYTES)
        self._window = ""  # cleaned text received since the last thing we typed
        self._eof = False
        self._on_line = on_line  # each console line, as it comes (the terminal's progress line)
        self.suite_boots = suite_boots  # boots the conformance suite reports on (0: it does not run)
        self.agent_socket = agent_socket
        self.control_socket = control_socket
        self._control: socket.socket | None = None
        self.qmp_socket = qmp_socket
        self._last_data = time.monotonic()  # when the console last said anything

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
            if self.control_socket is not None:
                # connected from the start: the guest's reads of its end return nothing while the host's is not
                self._control = _connect_unix(self.control_socket, seconds=10)
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
        self._received += len(data)
        self._last_data = time.monotonic()
        if self._received > MAX_CONSOLE_BYTES:
            self.state.facts.fatal = (f"the guest flooded its serial console (more than "
                                      f"{MAX_CONSOLE_BYTES // 2**20} MiB): stopped")
            return False
        text = self._decoder.decode(data)
        self._window = (self._window + clean_console(text.replace("\r", "")))[-65536:]
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LINE_CHARS:  # no newline in sight: take it as a line, cut
            lines.append(self._partial[:MAX_LINE_CHARS])
            self._partial = ""
        for raw in lines:
            line = redact(clean_console(raw).rstrip())  # a secret the guest prints is not logged or shown
            log.debug("serial: %s", line)
            self.state.facts.feed(line)
            if self._on_line is not None:
                self._on_line(line)
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
            for sock in (self._sock, self._control):
                if sock is not None:
                    sock.close()
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
            # a prompt has no newline: look at the raw window (cleared only when we type)
            if facts.multi_user_seen and _LOGIN_RE.search(self._window):
                facts.login_prompt_seen = True
            if facts.criterion == "cloud-init" and facts.finished_seen and not facts.marker_seen:
                finished_at = finished_at or time.monotonic()
                if time.monotonic() - finished_at > MARKER_GRACE:
                    facts.fatal = "cloud-init finished but the marker never appeared (was the seed read?)"
        if facts.passed:
            self.state.passed_at = time.monotonic()
            log.info("serial console: %s seen", facts.describe)
            if self.login is not None:
                self.state.login_ok = self._do_login(self.login)
                log.info("serial console login as %s: %s", self.login.user,
                         "ok" if self.state.login_ok else "FAILED")
                if self.ssh_port is not None:
                    self._ssh(self.ssh_port, self.login)
            if self.suite_boots:
                self._suite()

    def _until(self, done: Callable[[], bool], *, after_reboot: bool = False) -> bool:
        """Keep draining the console until done() (True), or a fatal line, EOF or the deadline (False). After
        the guest's reboot, once: when the console has said nothing for STALL_SECONDS (the firmware stalled on
        the warm reset: kiln.boot.qmp), reset the machine through QMP."""
        facts = self.state.facts
        reset = not after_reboot or self.qmp_socket is None
        while not done():
            if facts.fatal is not None or time.monotonic() >= self.deadline or not self._pump():
                return False
            quiet = time.monotonic() - self._last_data
            if not reset and self.qmp_socket is not None and quiet >= STALL_SECONDS:
                reset = True
                log.warning("conformance: nothing on the console for %.0f s after the guest's reboot (the firmware "
                            "stalled on the warm reset); resetting the machine once", quiet)
                try:
                    qmp.execute(self.qmp_socket, "system_reset")
                except (OSError, ValueError, BootTestError) as exc:
                    log.warning("conformance: the reset failed: %s", exc)
        return True

    def _in_background(self, work: Callable[[threading.Event], None], name: str) -> None:
        """Run work(stop) in another thread while this one keeps draining the console."""
        stop = threading.Event()
        worker = threading.Thread(target=work, args=(stop,), name=name, daemon=True)
        worker.start()
        while worker.is_alive() and self._pump() and time.monotonic() < self.deadline:
            pass
        stop.set()
        worker.join(timeout=30)

    def _suite(self) -> None:
        """The conformance suite: its first boot's report, the guest agent, the reboot and the second report."""
        facts = self.state.facts
        reports = facts.reports
        if not self._until(lambda: reports.done(1)):
            return
        log.info("conformance: boot 1 reported %d checks", len(reports.of_boot(1)))
        if self.agent_socket is not None:
            agent_socket = self.agent_socket

            def ping(stop: threading.Event) -> None:
                self.state.agent = guest_agent.ping(agent_socket, deadline=min(self.deadline,
                                                                               time.monotonic() + 90), stop=stop)

            self._in_background(ping, "kiln-agent")
            log.info("conformance: guest agent %s", "answered guest-ping" if self.state.agent == "" else
                     self.state.agent)
        if self.suite_boots < 2 or self.control_socket is None:
            return
        facts.rebooting = True
        if self._control is None:
            raise BootTestError("the conformance suite's control channel was never connected")
        # the guest may not be reading yet: say it until it goes
        for _ in range(60):
            self._control.sendall(b"reboot\n")
            if self._until_for(lambda: facts.reboot_seen, 5.0):
                break
        log.info("conformance: rebooting the guest")
        if self._until(lambda: reports.done(2), after_reboot=True):
            log.info("conformance: boot 2 reported %d checks", len(reports.of_boot(2)))

    def _until_for(self, done: Callable[[], bool], seconds: float) -> bool:
        until = time.monotonic() + seconds
        while not done():
            if time.monotonic() >= min(until, self.deadline) or not self._pump():
                return False
        return True

    def _ssh(self, port: int, login: Login) -> None:
        """SSH in from another thread while this one keeps draining the console (QEMU's serial output
        must never back up into the guest)."""
        deadline = min(self.deadline, time.monotonic() + 120)
        gone = threading.Event()  # the console closed: QEMU exited, and the forwarded port with it

        def attempt() -> None:
            self.state.ssh_ok = guest_ssh.ssh_login(port, login.user, login.password, deadline=deadline,
                                                    stop=gone)

        worker = threading.Thread(target=attempt, name=f"kiln-ssh-{port}", daemon=True)
        worker.start()
        while worker.is_alive() and self._pump():
            pass
        if worker.is_alive():
            gone.set()
        worker.join(timeout=40)  # at most one ssh attempt (30 s) still running
        if gone.is_set() or self.state.ssh_ok is None:
            self.state.ssh_ok = bool(self.state.ssh_ok) and not gone.is_set()

    def _do_login(self, login: Login) -> bool:
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
