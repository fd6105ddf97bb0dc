"""The one place kiln runs subprocesses.

Every child is started in its own process group so that a timeout kills it with all its descendants,
and is registered so that a SIGTERM/SIGINT to kiln (a cancelled Prefect run, Ctrl-C) takes the
children down too. Output is streamed line by line into the `kiln.run` logger (which Prefect forwards
into the run's logs) and the last lines are kept for the error message. Output that a program parses
(`output`, `capture`) is stdout alone: stderr is read apart, logged and kept for the error message, so
that a warning on stderr cannot corrupt it. (`interactive` hands the user's terminal to the child.)
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from kiln.model.errors import CommandError

log = logging.getLogger("kiln.run")

TAIL_LINES = 25
STDERR_JOIN_TIMEOUT = 10.0
PROCESS_JOURNAL = "processes.json"
_active: set[int] = set()
# re-entrant: kiln's signal handler (terminate_all) runs in the main thread, possibly while that thread holds
# the lock in the middle of a journal write; a plain lock would wait for itself forever
_active_lock = threading.RLock()
# the work directory of the build this thread works for: children are journaled there so that
# `kiln gc` can kill what a SIGKILLed build left running
_journal: contextvars.ContextVar[Path | None] = contextvars.ContextVar("kiln_process_journal", default=None)
_redactions: set[str] = set()


def redact_value(secret: str) -> None:
    """Never show this value in logs or error messages again (in this process)."""
    if secret and len(secret) >= 3:
        _redactions.add(secret)


def redact(text: str) -> str:
    for secret in _redactions:
        if secret in text:
            text = text.replace(secret, "******")
    return text


@contextlib.contextmanager
def tracked(workdir: Path) -> Iterator[None]:
    """Journal every child started in this context in `workdir` (see `reap_journal`)."""
    token = _journal.set(workdir)
    try:
        yield
    finally:
        _journal.reset(token)


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _journal_update(workdir: Path, pid: int, add: bool) -> None:
    path = workdir / PROCESS_JOURNAL
    with _active_lock:
        try:
            entries: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            entries = {}
        if add:
            entries[str(pid)] = _start_time(pid) or ""
        else:
            entries.pop(str(pid), None)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, path)


def reap_journal(workdir: Path) -> list[int]:
    """Kill the process groups a dead build journaled (checking start times against pid reuse)."""
    path = workdir / PROCESS_JOURNAL
    try:
        entries: dict[str, str] = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    killed = []
    for pid_text, started in entries.items():
        pid = int(pid_text)
        if _start_time(pid) == started and started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
                killed.append(pid)
    path.unlink(missing_ok=True)
    return killed


@dataclass
class Completed:
    args: list[str]
    returncode: int
    lines: list[str] = field(default_factory=list)  # stdout and stderr merged, or stdout alone (stderr_apart)
    stderr_lines: list[str] = field(default_factory=list)  # with stderr_apart

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


# what kiln holds and its children (QEMU, mkfs, qemu-img, mmdebstrap …) have no business with: the Prefect
# API's credentials, cloud and S3 secrets, passwords and tokens of any name
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|PASSPHRASE|SECRET|TOKEN|CREDENTIAL|PRIVATE_KEY|API_KEY|AUTH_STRING")


_CREDENTIAL_VALUE = re.compile(r"://[^/@\s]*:[^/@\s]*@")  # user:password@ in a URL (a database's, a proxy's)


def child_environment() -> dict[str, str]:
    """The environment a child gets when its caller names none: kiln's own, without its secrets (by their
    names, or by the credentials in a URL value)."""
    return {k: v for k, v in os.environ.items() if not SECRET_NAME.search(k.upper())
            and (k.lower().endswith("_proxy") or not _CREDENTIAL_VALUE.search(v))}  # a proxy is how children fetch


def describe(args: Sequence[str]) -> str:
    return shlex.join(str(a) for a in args)


def _register(pgid: int) -> None:
    with _active_lock:
        _active.add(pgid)


def _unregister(pgid: int) -> None:
    with _active_lock:
        _active.discard(pgid)


def kill_group(pgid: int, *, grace: float = 5.0) -> None:
    """SIGTERM a process group, then SIGKILL whatever is left after `grace` seconds."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def terminate_all() -> None:
    """Kill every child kiln started and that still runs (signal handlers call this)."""
    with _active_lock:
        groups = list(_active)
    for pgid in groups:
        kill_group(pgid, grace=2.0)


def run(
    args: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float | None = None,
    input: bytes | None = None,
    check: bool = True,
    quiet: bool = False,
    on_line: Callable[[str], None] | None = None,
    what: str | None = None,
    stderr_apart: bool = False,
) -> Completed:
    """Run a command, stream its merged output, return its lines; raise CommandError on failure.

    `what` names the step for the error message (default: the command line). `quiet` logs the output
    at DEBUG instead of INFO. `timeout` kills the whole process group. With `stderr_apart`, stderr is
    read on its own: it is logged and makes the error's tail (stdout's tail when stderr said nothing)
    but stays out of `lines` and `on_line`, which see stdout alone.
    """
    argv = [os.fspath(a) for a in args]
    label = what or describe(argv)
    log.debug("running: %s", describe(argv))
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    lines: list[str] = []
    err_tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    err_lines: list[str] = []
    level = logging.DEBUG if quiet else logging.INFO
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if stderr_apart else subprocess.STDOUT,
            env=dict(env) if env is not None else child_environment(),
            cwd=cwd,
            process_group=0,
        )
    except OSError as exc:
        raise CommandError(f"{label}: cannot start {argv[0]}: {exc.strerror}", returncode=None, tail=[]) from exc
    _register(proc.pid)
    journal = _journal.get()
    if journal is not None:
        _journal_update(journal, proc.pid, add=True)
    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        kill_group(proc.pid)

    timer = threading.Timer(timeout, on_timeout) if timeout else None
    reader: threading.Thread | None = None
    if proc.stderr is not None:
        reader = threading.Thread(target=_drain, args=(proc.stderr, err_lines, err_tail, level),
                                  name=f"stderr of {proc.pid}", daemon=True)
        reader.start()
    try:
        if timer:
            timer.daemon = True
            timer.start()
        if input is not None and proc.stdin is not None:
            try:
                proc.stdin.write(input)
                proc.stdin.close()
            except BrokenPipeError:
                pass
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = _decode(raw)
            lines.append(line)
            tail.append(line)
            log.log(level, "%s", line)
            if on_line:
                on_line(line)
        returncode = proc.wait()
    except BaseException:
        kill_group(proc.pid, grace=2.0)
        proc.wait()
        raise
    finally:
        if timer:
            timer.cancel()
        # the leader is gone; make sure nothing it left in its group survives
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if reader is not None:
            # stderr ends with the group; only a child that left the group could hold it open longer
            reader.join(timeout=STDERR_JOIN_TIMEOUT)
        _unregister(proc.pid)
        if journal is not None:
            _journal_update(journal, proc.pid, add=False)
    error_tail = _tail(err_tail, list(err_lines)) if err_lines else _tail(tail, lines)
    if timed_out.is_set():
        raise CommandError(f"{label}: timed out after {timeout:.0f} s", returncode=None, tail=error_tail)
    if check and returncode != 0:
        raise CommandError(f"{label}: exited with {returncode}", returncode=returncode, tail=error_tail)
    return Completed(argv, returncode, lines, list(err_lines))


def _decode(raw: bytes) -> str:
    line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    return redact(line) if _redactions else line


def _drain(stream: IO[bytes], lines: list[str], tail: collections.deque[str], level: int) -> None:
    """Read a child's stderr apart from its stdout (in a thread of its own, so neither pipe fills up)."""
    with stream:
        for raw in stream:
            line = _decode(raw)
            lines.append(line)
            tail.append(line)
            log.log(level, "%s", line)


# causes worth naming even when the command went on printing long after them
_CAUSES = ("No space left on device", "Read-only file system", "Cannot allocate memory")


def _tail(tail: collections.deque[str], lines: list[str]) -> list[str]:
    """The output's tail, led by the first line that names a cause (a full disk…) scrolled out of it."""
    kept = list(tail)
    for line in lines[: max(0, len(lines) - len(kept))]:
        if any(cause in line for cause in _CAUSES):
            return [f"(earlier) {line}", *kept]
    return kept


def output(
    args: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float | None = None,
    what: str | None = None,
) -> str:
    """Run quietly and return its stdout as one stripped string (for output a program parses, such as JSON,
    which a warning on stderr must not corrupt); raise CommandError with stderr's tail when it fails."""
    return run(args, env=env, cwd=cwd, timeout=timeout, what=what, quiet=True, stderr_apart=True).output.strip()


def capture(args: Sequence[str | os.PathLike[str]], *, timeout: float, what: str) -> str:
    """Run a short command and return its stdout alone, unstripped (as `output`, which it predates)."""
    completed = run(args, timeout=timeout, what=what, quiet=True, stderr_apart=True)
    return "".join(line + "\n" for line in completed.lines)


def interactive(args: Sequence[str | os.PathLike[str]], *, env: Mapping[str, str], what: str) -> int:
    """Run a command on the user's terminal (a debugging shell); needs a TTY on stdin."""
    if not sys.stdin.isatty():
        raise CommandError(f"{what}: needs an interactive terminal on stdin", returncode=None, tail=[])
    log.info("%s: starting an interactive shell; exit it to continue the build", what)
    return subprocess.call([os.fspath(a) for a in args], env=dict(env))


def spawn(args: Sequence[str | os.PathLike[str]], *, log_file: Path, env: Mapping[str, str] | None = None,
          cwd: Path | None = None, new_session: bool = False) -> subprocess.Popen[bytes]:
    """Start a service that outlives the call (the Prefect server, a worker): its stdin closed, stdout and
    stderr appended to `log_file`, in a process group of its own (`new_session`: a session of its own too,
    so a terminal's signals and kiln's exit do not reach it). Not registered with `terminate_all`: its
    owner stops it. OSError when it cannot start."""
    argv = [str(a) for a in args]
    log.debug("starting: %s (output to %s)", describe(argv), log_file)
    with open(log_file, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(env) if env is not None else child_environment(), cwd=cwd, close_fds=True,
                                start_new_session=new_session, process_group=None if new_session else 0)
