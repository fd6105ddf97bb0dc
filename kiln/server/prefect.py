"""kiln's embedded Prefect server: started on first use, reused by every later kiln command.

Without `PREFECT_API_URL` every Prefect process would start its own temporary server (slow, and it
loses task-run history at exit), so kiln keeps one local `prefect server start` with SQLite under its
state directory (`<state>/prefect/`), detached in its own session so that it outlives the kiln command
that started it, recorded in `<state>/prefect/server.json`, and points its runs at it. A
`PREFECT_API_URL` the user set wins: kiln only checks that it answers.

Typical use, before anything imports `prefect`::

    state = state_dir()
    configure_environment(ensure_server(state), state)
    from flows.build import build_image   # prefect reads its settings here, at import time

Prefect snapshots its settings and configures its logging when `prefect` is first imported, so
`configure_environment` must run before that import; if `prefect` is already imported it re-reads
its settings and logging configuration (see `configure_environment`). This module itself never
imports `prefect`.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kiln.host.run import spawn
from kiln.host.state import private_dir, state_dir
from kiln.model.errors import ServerError
from kiln.server.api_http import CLIENT_AUTH_ENV, api_call, auth_string, http_get, register, server_settings

log = logging.getLogger("kiln.prefect_server")

HOST = "127.0.0.1"
DEFAULT_PORT = 4200
PORT_RANGE = 100  # 4200 .. 4299 are tried when 4200 is taken by something else
SERVER_JSON = "server.json"
LOCK_FILE = "server.lock"
LOG_FILE = "server.log"
DB_FILE = "prefect.db"
LOG_TAIL_LINES = 30
STOP_GRACE = 20.0
MAX_PID = 1 << 22  # the kernel's PID_MAX_LIMIT
# Marks a PREFECT_API_URL that kiln itself set (configure_environment), so that a later
# ensure_server in the same process or a child treats it as kiln's own server, not the user's.
MANAGED_ENV = "KILN_PREFECT_MANAGED_URL"
# The loggers kiln's mechanisms use; Prefect forwards them into the run logs.
KILN_LOGGER = "kiln"


# --------------------------------------------------------------------------------------- paths


def prefect_home(state: Path) -> Path:
    """`PREFECT_HOME` for kiln: `<state>/prefect` (server database, log, results, profiles), absolute."""
    return Path(state).expanduser().absolute() / "prefect"


def api_url_for(port: int) -> str:
    return f"http://{HOST}:{port}/api"


# --------------------------------------------------------------------------------------- probes


def check_health(api_url: str, *, timeout: float = 3.0) -> bool:
    """True when `GET <api_url>/health` answers 200 (the server is up and serving)."""
    return http_get(api_url.rstrip("/") + "/health", timeout=timeout)[0] == 200


def client_version() -> str:
    """The version of the Prefect installed beside this kiln (without importing it)."""
    try:
        return importlib.metadata.version("prefect")
    except importlib.metadata.PackageNotFoundError:
        return ""


def active_runs(api_url: str, *, timeout: float = 5.0, auth: str | None = None) -> int | None:
    """How many flow runs the server has pending, running or cancelling; None when it cannot say."""
    body = {"flow_runs": {"state": {"type": {"any_": ["PENDING", "RUNNING", "CANCELLING"]}}}}
    try:
        status, count = api_call(api_url, "POST", "/flow_runs/count", body, timeout=timeout, auth=auth)
    except ServerError:
        return None
    return count if status == 200 and isinstance(count, int) and not isinstance(count, bool) else None


def unfit(record: dict[str, Any], *, timeout: float = 5.0) -> str | None:
    """Why a running, healthy server kiln recorded cannot serve a user, or None. The API can go on
    answering from memory after the installation it was started from is gone (another checkout's
    virtualenv, deleted), while its UI answers "Internal Server Error"; and a server of another Prefect
    version than this kiln's client refuses or misreads what the client sends."""
    python = str(record.get("python") or "")
    if python and not Path(python).exists():
        return f"its Python {python} no longer exists (the installation it was started from is gone)"
    if not record.get("auth"):
        return "it was started without credentials (its API answers anyone)"
    url = str(record["url"])
    status, body = http_get(url.rstrip("/") + "/admin/version", timeout=timeout, auth=_auth_of(record))
    if status == 200:
        with contextlib.suppress(ValueError):
            theirs, ours = str(json.loads(body)), client_version()
            if ours and theirs != ours:
                return f"it runs Prefect {theirs}, this kiln's client is Prefect {ours}"
    ui = str(record.get("ui_url") or url.removesuffix("/api"))
    for attempt in range(2):  # a server busy with builds may be slow to serve a page once
        status, body = http_get(ui, timeout=timeout)
        if status == 200 and b"<html" in body.lower():
            break
        time.sleep(1.0 * (attempt == 0))
    if status != 200 or b"<html" not in body.lower():
        return f"its UI ({ui}) answers {status or 'nothing'}" + ("" if status != 200 else " without a page")
    return None


def _auth_of(record: dict[str, Any]) -> str | None:
    """The auth string of the server `record` describes (its state directory's)."""
    return auth_string(Path(str(record["home"])).parent) if record.get("home") else None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, process group) of a process from /proc, or None when it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may contain spaces: split after the last ')'
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[2])
    except (IndexError, ValueError):
        return None


def _reap(pid: int) -> None:
    """Collect `pid` if it is our own exited child (so it does not linger as a zombie)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def pid_alive(pid: int) -> bool:
    """True when `pid` runs; a zombie counts as dead (this machine's PID 1 may never reap it)."""
    if pid <= 0:
        return False
    _reap(pid)
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _is_our_server(pid: int, home: Path) -> bool:
    """Whether `pid` is a `prefect server start` with `PREFECT_HOME=home` (a recycled pid is not)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    words = [a.decode(errors="replace") for a in argv]
    if not ("prefect" in words and "server" in words and "start" in words):
        return False
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return True  # another user's process: the command line has to do
    for item in environ:
        if item.startswith(b"PREFECT_HOME="):
            return Path(item[len(b"PREFECT_HOME=") :].decode(errors="replace")) == home
    return False


def _has_home(pid: int, home: Path) -> bool:
    """Whether process `pid` runs with PREFECT_HOME=home (a child of kiln's server, say)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return (b"PREFECT_HOME=" + str(home).encode()) in environ


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        stat = _proc_stat(pid)
        if stat is not None and stat[1] == pgid and stat[0] not in ("Z", "X"):
            members.append(pid)
    return members


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _choose_port(port: int | None) -> int:
    if port is not None:
        if not _port_free(port):
            raise ServerError(f"cannot start the Prefect server: port {HOST}:{port} is already in use")
        return port
    for candidate in range(DEFAULT_PORT, DEFAULT_PORT + PORT_RANGE):
        if _port_free(candidate):
            if candidate != DEFAULT_PORT:
                log.info("port %d is taken by another program; using %d", DEFAULT_PORT, candidate)
            return candidate
    last = DEFAULT_PORT + PORT_RANGE - 1
    raise ServerError(f"cannot start the Prefect server: ports {DEFAULT_PORT}-{last} are all in use")


# --------------------------------------------------------------------------------------- records


def _read_record(home: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((home / SERVER_JSON).read_text())
    except (FileNotFoundError, ValueError, OSError):
        return None
    if not isinstance(data, dict):
        return None
    pid = data.get("pid")
    # a pid kiln could have written: a process of its own, never 0 (every kernel thread's group) or init
    if not isinstance(pid, int) or isinstance(pid, bool) or not 1 < pid < MAX_PID or not data.get("url"):
        return None
    return data


def _write_record(home: Path, record: dict[str, Any]) -> None:
    tmp = home / f".{SERVER_JSON}.{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(home / SERVER_JSON)


def _remove_record(home: Path) -> None:
    (home / SERVER_JSON).unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """Exclusive lock on `<home>/server.lock`: one kiln process checks and starts at a time."""
    try:
        private_dir(home.parent)
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(home / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ServerError(
            f"cannot use {home} for the Prefect server: {exc.strerror or exc} (set KILN_STATE to a writable directory)"
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _log_tail(home: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = (home / LOG_FILE).read_text(errors="replace")
    except OSError:
        return "    (no server log)"
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(f"    {line}" for line in tail) or "    (server log is empty)"


# --------------------------------------------------------------------------------------- server


def _server_env(home: Path, port: int) -> dict[str, str]:
    env = dict(os.environ)
    # the server must not think it is a client of another API, nor read a user's profile
    for key in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE", MANAGED_ENV):
        env.pop(key, None)
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / DB_FILE}",
            "PREFECT_UI_API_URL": api_url_for(port),
            "PREFECT_SERVER_API_HOST": HOST,
            "PREFECT_SERVER_API_PORT": str(port),
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PYTHONUNBUFFERED": "1",
            # the UI is what `kiln serve` and the fitness check (unfit) rely on: whatever a user's settings say
            "PREFECT_UI_ENABLED": "true",
            "PREFECT_SERVER_UI_ENABLED": "true",
            # no one without credentials, CSRF protection on, CORS only for the UI's own origin
            **server_settings(home.parent, api_url_for(port).removesuffix("/api")),
        }
    )
    for key in ("PREFECT_UI_SERVE_BASE", "PREFECT_SERVER_UI_SERVE_BASE"):
        env.pop(key, None)
    return env


def _server_argv(port: int) -> list[str]:
    # sys.executable: the interpreter (venv) kiln runs in, so its own prefect serves
    return [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]


def _start(home: Path, port: int, timeout: float) -> dict[str, Any]:
    """Start `prefect server start` detached, record it, wait until it answers; the lock is held."""
    url = api_url_for(port)
    logfile = home / LOG_FILE
    if logfile.exists():
        logfile.replace(home / (LOG_FILE + ".1"))  # keep the previous run's log, start a fresh one
    argv = _server_argv(port)
    log.info("starting the Prefect server on %s (state %s)", url, home)
    started = time.monotonic()
    try:
        # its own session and group: it outlives kiln and is immune to its terminal's signals
        proc = spawn(argv, log_file=logfile, env=_server_env(home, port), cwd=home, new_session=True)
    except OSError as exc:
        raise ServerError(f"cannot start the Prefect server ({argv[0]}): {exc.strerror}") from exc
    record: dict[str, Any] = {
        "pid": proc.pid,
        "port": port,
        "url": url,
        "ui_url": url.removesuffix("/api"),
        "started_at": time.time(),
        "python": sys.executable,
        "home": str(home),
        "log": str(logfile),
        "auth": True,  # it answers only with the state directory's auth string (kiln.server.api_http)
    }
    _write_record(home, record)
    deadline = started + timeout
    while True:
        if check_health(url, timeout=2.0):
            break
        code = proc.poll()
        if code is not None:
            _remove_record(home)
            raise ServerError(
                f"the Prefect server exited with {code} before it answered on {url}; "
                f"last lines of {logfile}:\n{_log_tail(home)}"
            )
        if time.monotonic() > deadline:
            _kill_group(proc.pid)
            _remove_record(home)
            raise ServerError(
                f"the Prefect server did not answer on {url} within {timeout:.0f} s; "
                f"last lines of {logfile}:\n{_log_tail(home)}"
            )
        time.sleep(0.25)
    elapsed = time.monotonic() - started
    record["ready_after"] = round(elapsed, 2)
    _write_record(home, record)
    log.info("Prefect server ready on %s after %.1f s (pid %d)", url, elapsed, proc.pid)
    # Popen would warn that the child still runs when it is collected; it is meant to outlive us.
    proc.returncode = 0
    return record


def _kill_group(pgid: int, grace: float = STOP_GRACE) -> bool:
    """SIGTERM the server's process group, SIGKILL what is left after `grace`; True if any was alive.
    Never group 0 or 1, nor kiln's own group (a record naming those is not a server kiln started)."""
    if pgid <= 1 or pgid == os.getpgrp():
        log.warning("not signalling process group %d: not a Prefect server kiln started", pgid)
        return False
    if not _group_members(pgid) and not pid_alive(pgid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(pgid)
        if not _group_members(pgid):
            return True
        time.sleep(0.2)
    log.warning("the Prefect server (group %d) ignored SIGTERM for %.0f s; killing it", pgid, grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while _group_members(pgid) and time.monotonic() < deadline:
        _reap(pgid)
        time.sleep(0.1)
    _reap(pgid)
    return True


def _user_api_url() -> str | None:
    """A PREFECT_API_URL the user set (not the one kiln set for its own server), or None."""
    url = os.environ.get("PREFECT_API_URL", "").strip()
    if not url or url == os.environ.get(MANAGED_ENV):
        return None
    return url


def ensure_server(state: Path | None = None, *, port: int | None = None, timeout: float = 180) -> str:
    """`_ensure_server`; kiln's own server's credentials registered for this process's calls to it."""
    url = _ensure_server(state, port=port, timeout=timeout)
    if _user_api_url() is None:
        register(url, auth_string(state if state is not None else state_dir()))
    return url


def _ensure_server(state: Path | None = None, *, port: int | None = None, timeout: float = 180) -> str:
    """Return the API URL kiln's runs should use, starting the local Prefect server if needed.

    A `PREFECT_API_URL` set by the user wins: it is only checked (`/api/health`). Otherwise the server
    recorded in `<state>/prefect/server.json` is reused when its process lives and answers; else a new
    one is started (on `port`, default 4200 or the next free port) and waited for up to `timeout`
    seconds. `port` only applies when a server is started. Raises ServerError with the tail of
    `server.log` when the server dies or never answers.
    """
    user_url = _user_api_url()
    if user_url is not None:
        if not check_health(user_url, timeout=10.0):
            raise ServerError(
                f"PREFECT_API_URL={user_url} does not answer ({user_url.rstrip('/')}/health failed): "
                "start that Prefect server, or unset PREFECT_API_URL to let kiln run its own"
            )
        return user_url

    home = prefect_home(state if state is not None else state_dir())
    with _locked(home):
        record = _read_record(home)
        if record is not None:
            pid, url = int(record["pid"]), str(record["url"])
            if pid_alive(pid) and _is_our_server(pid, home):
                why = unfit(record) if check_health(url) else "not answering"
                if why is None:
                    log.debug("reusing the Prefect server on %s (pid %d)", url, pid)
                    if "ready_after" not in record:  # its starter was interrupted before it answered
                        record["ready_after"] = round(time.time() - float(record.get("started_at", 0)), 2)
                        _write_record(home, record)
                    return url
                if why != "not answering":
                    active = active_runs(url, auth=_auth_of(record))
                    if active != 0:  # runs in flight (or unknown): a restart would kill them
                        log.warning("the Prefect server on %s (pid %d) cannot serve a user: %s; not restarting it "
                                    "while %s flow runs are active (kiln server stop, once they end)", url, pid,
                                    why, "its" if active is None else active)
                        return url
                    log.warning("the Prefect server on %s (pid %d) cannot serve a user: %s; restarting it from this "
                                "installation (%s)", url, pid, why, sys.executable)
                    _kill_group(pid)
                    _remove_record(home)
                    record = _start(home, _choose_port(port), timeout)
                    return str(record["url"])
                # ours and alive but not answering. Never seen ready: its starter was interrupted and it
                # may still be migrating its database, so give it the whole start timeout. Seen ready
                # before: it may just be busy; give it 30 s before restarting it.
                patience = min(timeout, 30.0) if "ready_after" in record else timeout
                deadline = time.monotonic() + patience
                while time.monotonic() < deadline and pid_alive(pid):
                    if check_health(url):
                        return url
                    time.sleep(0.5)
                log.warning("the Prefect server pid %d does not answer on %s; restarting it", pid, url)
                _kill_group(pid)
            else:
                log.debug("ignoring stale %s (pid %d is gone)", home / SERVER_JSON, pid)
            _remove_record(home)
        record = _start(home, _choose_port(port), timeout)
        return str(record["url"])


def stop_server(state: Path | None = None) -> bool:
    """Stop kiln's local Prefect server (SIGTERM its group, SIGKILL after a grace period).

    Removes `server.json`; returns True when a running server was stopped.
    """
    home = prefect_home(state if state is not None else state_dir())
    if not home.exists():
        return False
    with _locked(home):
        record = _read_record(home)
        if record is None:
            return False
        pid = int(record["pid"])
        stopped = False
        if pid_alive(pid) and _is_our_server(pid, home):
            log.info("stopping the Prefect server on %s (pid %d)", record.get("url"), pid)
            stopped = _kill_group(pid)
        elif _proc_stat(pid) is None and any(_has_home(member, home) for member in _group_members(pid)):
            # leader gone but children of its group survive (they carry its PREFECT_HOME): take them down too
            stopped = _kill_group(pid)
        _remove_record(home)
        return stopped


def server_status(state: Path | None = None) -> dict[str, Any] | None:
    """The recorded server (`server.json` plus `alive` and `healthy`), or None when none runs."""
    home = prefect_home(state if state is not None else state_dir())
    record = _read_record(home)
    if record is None:
        return None
    pid = int(record["pid"])
    alive = pid_alive(pid) and _is_our_server(pid, home)
    if not alive:
        return None
    record["alive"] = True
    record["healthy"] = check_health(str(record["url"]))
    why = unfit(record) if record["healthy"] else "the API does not answer"
    record["ui"] = "ok" if why is None else why  # what a user of the UI would meet
    return record


# --------------------------------------------------------------------------------------- clients


def client_environment(api_url: str, state: Path) -> dict[str, str]:
    """The environment variables a kiln process (or a child it starts) needs to use `api_url`."""
    home = prefect_home(state)
    state = home.parent
    extra = [n.strip() for n in os.environ.get("PREFECT_LOGGING_EXTRA_LOGGERS", "").split(",") if n.strip()]
    if KILN_LOGGER not in extra:
        extra.append(KILN_LOGGER)
    env = {
        "KILN_STATE": str(state),
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(home),
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "results"),
        "PREFECT_LOGGING_EXTRA_LOGGERS": ",".join(extra),  # the user's own extra loggers stay
        # kiln's loggers also log outside runs (CLI, before a flow starts): that is not an error
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    }
    if api_url == recorded_url(state):  # kiln's own server; another's credentials are the user's to set
        env[CLIENT_AUTH_ENV] = auth_string(state)
    return env


def configure_environment(api_url: str, state: Path) -> None:
    """Set in `os.environ` what a kiln process needs before it imports and runs Prefect flows.

    Call it before `import prefect`: Prefect reads its settings into a process-wide context and
    attaches the extra loggers when it is first imported. If `prefect` is already imported, its
    global settings context is refreshed and its logging set up again, so the new values apply to
    what runs afterwards (clients and services already created keep their old values).
    """
    env = client_environment(api_url, state)
    if api_url == recorded_url(state):
        env[MANAGED_ENV] = api_url
    os.environ.update(env)
    prefect_home(state).mkdir(parents=True, exist_ok=True)
    kiln_logger = logging.getLogger(KILN_LOGGER)
    if kiln_logger.level == logging.NOTSET:
        # Prefect attaches its API handler to the extra loggers but leaves their level alone; with the
        # root logger at WARNING, kiln's INFO lines (subprocess output) would never reach the run logs.
        kiln_logger.setLevel(logging.INFO)
    if "prefect" in sys.modules:
        _refresh_prefect()


def recorded_url(state: Path) -> str | None:
    """The URL in `<state>/prefect/server.json`, whether or not that server still runs."""
    record = _read_record(prefect_home(state))
    return str(record["url"]) if record else None


def _refresh_prefect() -> None:
    """Make an already imported prefect re-read the environment (settings context and logging)."""
    # imported here, not at the top: this module is loaded before Prefect's settings exist (see
    # configure_environment); this function runs only once Prefect is imported anyway
    from prefect import context
    from prefect.logging import configuration

    # setup_logging appends the API handler to every extra logger: drop the ones attached before, or
    # each line would reach the server once per call
    names = {KILN_LOGGER, *os.environ.get("PREFECT_LOGGING_EXTRA_LOGGERS", "").split(",")}
    for name in filter(None, (n.strip() for n in names)):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler).__module__.startswith("prefect."):
                logger.removeHandler(handler)
    context.refresh_global_settings_context()
    configuration.setup_logging(incremental=False)
