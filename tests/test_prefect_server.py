"""kiln's embedded Prefect server: fast unit tests, and one slow test against a real server.

The slow test starts `prefect server start` in a temporary state directory (6-40 s), runs a flow
against it in a subprocess and reads the run back through the Prefect client in another subprocess,
so this pytest process never imports prefect (its import configures logging and settings globally).
"""

from __future__ import annotations

import base64
import http.server
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln.model.errors import ServerError
from kiln.server import api_http
from kiln.server import prefect as ps

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in ("PREFECT_API_URL", ps.MANAGED_ENV, "KILN_STATE", "XDG_STATE_HOME"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


SERVED: dict[str, tuple[int, bytes]] = {}  # what the stand-in answers besides its defaults (per test)


@pytest.fixture
def health_server() -> Iterator[str]:
    """A stand-in server answering like a healthy Prefect server of this kiln's version: /api/health, its
    version (/api/admin/version) and its UI page (/): yields its API URL. SERVED overrides a path."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answers = {"/api/health": (200, b"true"), "/api/admin/version": (200, json.dumps(
                ps.client_version()).encode()), "/": (200, b"<!DOCTYPE html><html><body>Prefect</body></html>"),
                **SERVED}
            status, body = answers.get(self.path, (404, b""))
            self.send_response(status)
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # /api/flow_runs/count: the runs a restart would kill
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, body = {"/api/flow_runs/count": (200, b"0"), **SERVED}.get(self.path, (404, b""))
            self.send_response(status)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api"
    finally:
        SERVED.clear()
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------------ fast


def test_state_dir_from_env(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("KILN_STATE", str(tmp_path / "st"))
    assert ps.state_dir() == tmp_path / "st"


def test_state_dir_defaults(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setattr(os, "geteuid", lambda: 0)
    assert ps.state_dir() == Path("/var/lib/kiln")
    clean_env.setattr(os, "geteuid", lambda: 1000)
    clean_env.setenv("HOME", str(tmp_path))
    assert ps.state_dir() == tmp_path / ".local" / "state" / "kiln"
    clean_env.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert ps.state_dir() == tmp_path / "xdg" / "kiln"


def test_relative_state_is_made_absolute(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # the server runs with cwd = its PREFECT_HOME: a relative path would point somewhere else there
    clean_env.chdir(tmp_path)
    assert ps.prefect_home(Path("st")) == tmp_path / "st" / "prefect"
    env = ps.client_environment("http://127.0.0.1:1/api", Path("st"))
    assert env["KILN_STATE"] == str(tmp_path / "st")
    assert env["PREFECT_LOCAL_STORAGE_PATH"] == str(tmp_path / "st" / "prefect" / "results")


def test_pid_alive() -> None:
    assert ps.pid_alive(os.getpid())
    assert not ps.pid_alive(dead_pid())
    assert not ps.pid_alive(0)


def _write_record(state: Path, pid: int, url: str) -> None:
    home = ps.prefect_home(state)
    home.mkdir(parents=True)
    (home / ps.SERVER_JSON).write_text(json.dumps({"pid": pid, "port": 1, "url": url, "auth": True}))


@pytest.mark.parametrize("who", ["dead", "not-a-server"])
def test_stale_record_is_ignored(clean_env: pytest.MonkeyPatch, tmp_path: Path, health_server: str, who: str) -> None:
    # the recorded pid is gone, or is a live process that is not our server (a recycled pid): even
    # though the recorded URL answers, a new server is started
    pid = dead_pid() if who == "dead" else os.getpid()
    _write_record(tmp_path, pid, health_server)
    assert ps.server_status(tmp_path) is None
    started: list[int] = []

    def fake_start(home: Path, port: int, timeout: float) -> dict[str, Any]:
        started.append(port)
        assert not (home / ps.SERVER_JSON).exists(), "the stale record is removed first"
        return {"pid": 1, "port": port, "url": ps.api_url_for(port)}

    clean_env.setattr(ps, "_start", fake_start)
    port = free_port()
    assert ps.ensure_server(tmp_path, port=port) == ps.api_url_for(port)
    assert started == [port]
    assert ps.stop_server(tmp_path) is False  # nothing recorded, nothing stopped


def test_live_record_is_reused(clean_env: pytest.MonkeyPatch, tmp_path: Path, health_server: str) -> None:
    _write_record(tmp_path, os.getpid(), health_server)
    clean_env.setattr(ps, "_is_our_server", lambda pid, home: True)
    clean_env.setattr(ps, "_start", lambda *a: pytest.fail("must reuse, not start"))
    assert ps.ensure_server(tmp_path) == health_server
    status = ps.server_status(tmp_path)
    assert status is not None and status["healthy"] and status["pid"] == os.getpid()


@pytest.mark.parametrize(("problem", "says"), [
    ("python gone", "no longer exists"),
    ("other version", "it runs Prefect 2.0.0"),
    ("ui broken", "answers 500"),
    ("no credentials", "started without credentials"),  # a kiln before the API asked for them started it
])
def test_a_server_that_cannot_serve_a_user_is_restarted(clean_env: pytest.MonkeyPatch, tmp_path: Path,
                                                        health_server: str, problem: str, says: str) -> None:
    """The API answers from memory, but the installation it was started from is gone, or it is another
    Prefect version, or its UI answers an error: kiln restarts it from this installation (issue 19)."""
    _write_record(tmp_path, os.getpid(), health_server)
    record = json.loads((ps.prefect_home(tmp_path) / ps.SERVER_JSON).read_text())
    record["python"] = str(tmp_path / "gone-venv" / "bin" / "python3") if problem == "python gone" else sys.executable
    (ps.prefect_home(tmp_path) / ps.SERVER_JSON).write_text(json.dumps(record))
    if problem == "other version":
        SERVED["/api/admin/version"] = (200, b'"2.0.0"')
    if problem == "ui broken":
        SERVED["/"] = (500, b"Internal Server Error")
    if problem == "no credentials":
        del record["auth"]
        (ps.prefect_home(tmp_path) / ps.SERVER_JSON).write_text(json.dumps(record))
    clean_env.setattr(ps, "_is_our_server", lambda pid, home: True)
    status = ps.server_status(tmp_path)
    assert status is not None and status["healthy"] and says in status["ui"], status
    killed: list[int] = []
    started: list[int] = []
    clean_env.setattr(ps, "_kill_group", lambda pid, grace=0: killed.append(pid) or True)
    clean_env.setattr(ps, "_start", lambda home, port, timeout: started.append(port) or {"url": "http://new/api"})
    assert ps.ensure_server(tmp_path) == "http://new/api"
    assert killed == [os.getpid()] and len(started) == 1


def test_a_server_with_runs_in_flight_is_not_restarted(clean_env: pytest.MonkeyPatch, tmp_path: Path,
                                                        health_server: str) -> None:
    """Unfit or not, a server whose flow runs are active keeps them: kiln warns and uses it."""
    _write_record(tmp_path, os.getpid(), health_server)
    SERVED["/"] = (500, b"Internal Server Error")
    SERVED["/api/flow_runs/count"] = (200, b"2")
    clean_env.setattr(ps, "_is_our_server", lambda pid, home: True)
    clean_env.setattr(ps, "_kill_group", lambda *a, **k: pytest.fail("must not kill a server with runs"))
    clean_env.setattr(ps, "_start", lambda *a: pytest.fail("must not start another"))
    assert ps.ensure_server(tmp_path) == health_server


@pytest.mark.parametrize("pid", [0, 1, True, -5, 99999999999999999999, "123"])
def test_a_record_naming_no_server_of_ours_is_never_signalled(clean_env: pytest.MonkeyPatch, tmp_path: Path,
                                                              pid: object) -> None:
    """server.json is a file on disk: a pid of 0 (every kernel thread's group), 1, a bool, a huge number or a
    string makes kiln signal nothing (pid 0 once took down kiln's own process group)."""
    home = ps.prefect_home(tmp_path)
    home.mkdir(parents=True)
    (home / ps.SERVER_JSON).write_text(json.dumps({"pid": pid, "url": "http://127.0.0.1:9/api"}))
    signalled: list[tuple[int, int]] = []
    clean_env.setattr(os, "killpg", lambda pgid, sig: signalled.append((pgid, sig)))
    assert ps.stop_server(tmp_path) is False
    assert ps.server_status(tmp_path) is None
    assert ps._kill_group(0) is False and ps._kill_group(os.getpgrp()) is False
    assert signalled == []


def test_an_orphaned_group_is_stopped_only_when_it_is_kiln_s(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A leader gone, its group alive: stopped only if its processes run with this PREFECT_HOME."""
    stranger = subprocess.Popen(["setsid", "bash", "-c", "sleep 60 & sleep 60"])
    try:
        time.sleep(0.3)
        _write_record(tmp_path, stranger.pid, "http://127.0.0.1:9/api")
        clean_env.setattr(ps, "_proc_stat", lambda pid: None)  # as if the leader had exited
        signalled: list[int] = []
        clean_env.setattr(os, "killpg", lambda pgid, sig: signalled.append(pgid))
        assert ps.stop_server(tmp_path) is False and signalled == []
    finally:
        stranger.kill()
        stranger.wait()


def test_a_fit_server_reports_its_ui_ok(clean_env: pytest.MonkeyPatch, tmp_path: Path, health_server: str) -> None:
    _write_record(tmp_path, os.getpid(), health_server)
    clean_env.setattr(ps, "_is_our_server", lambda pid, home: True)
    status = ps.server_status(tmp_path)
    assert status is not None and status["ui"] == "ok"


def test_concurrent_ensure_starts_once(clean_env: pytest.MonkeyPatch, tmp_path: Path, health_server: str) -> None:
    """Two callers at once (flock on server.lock): one starts, the other waits and reuses."""
    calls: list[int] = []

    def slow_start(home: Path, port: int, timeout: float) -> dict[str, Any]:
        calls.append(port)
        time.sleep(0.5)
        record = {"pid": os.getpid(), "port": port, "url": health_server, "ready_after": 0.5, "auth": True}
        (home / ps.SERVER_JSON).write_text(json.dumps(record))
        return record

    clean_env.setattr(ps, "_start", slow_start)
    clean_env.setattr(ps, "_is_our_server", lambda pid, home: True)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(ps.ensure_server(tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [health_server] * 3


def test_user_api_url_closed_port(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    clean_env.setenv("PREFECT_API_URL", url)
    with pytest.raises(ServerError, match="does not answer") as info:
        ps.ensure_server(tmp_path)
    assert url in str(info.value)
    assert not (tmp_path / "prefect").exists(), "a user's server means kiln starts nothing"


def test_user_api_url_wins(clean_env: pytest.MonkeyPatch, tmp_path: Path, health_server: str) -> None:
    clean_env.setenv("PREFECT_API_URL", health_server)
    assert ps.ensure_server(tmp_path) == health_server
    assert not (tmp_path / "prefect").exists()


def test_managed_url_in_env_is_not_the_users(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # configure_environment marks kiln's own URL: a later ensure_server (same process or a child)
    # manages that server (restarts it if it died) instead of failing as for a user's URL
    url = f"http://127.0.0.1:{free_port()}/api"
    clean_env.setenv("PREFECT_API_URL", url)
    clean_env.setenv(ps.MANAGED_ENV, url)
    clean_env.setattr(ps, "_start", lambda home, port, timeout: {"url": "http://127.0.0.1:9/api"})
    assert ps.ensure_server(tmp_path) == "http://127.0.0.1:9/api"


def test_port_in_use(clean_env: pytest.MonkeyPatch) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServerError, match=str(port)):
            ps._choose_port(port)
        clean_env.setattr(ps, "DEFAULT_PORT", port)  # the default is taken by something else
        chosen = ps._choose_port(None)
        assert chosen != port and port < chosen < port + ps.PORT_RANGE


def test_server_that_dies_reports_its_log(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    script = "import sys; print('sqlite3.OperationalError: unable to open database file'); sys.exit(3)"
    clean_env.setattr(ps, "_server_argv", lambda port: [sys.executable, "-c", script])
    with pytest.raises(ServerError) as info:
        ps.ensure_server(tmp_path, port=free_port(), timeout=30)
    text = str(info.value)
    assert "exited with 3" in text and "unable to open database file" in text
    assert ps.server_status(tmp_path) is None
    assert not (tmp_path / "prefect" / ps.SERVER_JSON).exists()


def test_server_that_never_answers_is_killed(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    script = "import time; print('migrating...', flush=True); time.sleep(600)"
    clean_env.setattr(ps, "_server_argv", lambda port: [sys.executable, "-c", script])
    with pytest.raises(ServerError, match=r"did not answer .* within 2 s") as info:
        ps.ensure_server(tmp_path, port=free_port(), timeout=2)
    assert "migrating..." in str(info.value)
    assert not (tmp_path / "prefect" / ps.SERVER_JSON).exists()
    # nothing of it is left: no process runs that script
    out = subprocess.run(["pgrep", "-f", "time.sleep\\(600\\)"], capture_output=True, text=True).stdout.split()
    assert not [pid for pid in out if ps.pid_alive(int(pid))]


def test_configure_environment(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = ps.client_environment("http://127.0.0.1:4321/api", tmp_path)
    for key in [*env, "PREFECT_LOGGING_EXTRA_LOGGERS", ps.MANAGED_ENV]:
        clean_env.setenv(key, "")  # registers every key for restoring after the test
    clean_env.setenv("PREFECT_LOGGING_EXTRA_LOGGERS", "paramiko")
    refreshed: list[bool] = []
    clean_env.setattr(ps, "_refresh_prefect", lambda: refreshed.append(True))
    kiln_logger = logging.getLogger("kiln")
    clean_env.setattr(kiln_logger, "level", logging.NOTSET)
    ps.configure_environment("http://127.0.0.1:4321/api", tmp_path)
    home = tmp_path / "prefect"
    assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:4321/api"
    assert os.environ["PREFECT_HOME"] == str(home)
    assert os.environ["PREFECT_LOCAL_STORAGE_PATH"] == str(home / "results")
    assert os.environ["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] == "true"
    assert os.environ["DO_NOT_TRACK"] == "1"
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] == "paramiko,kiln"
    assert os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] == "ignore"
    assert os.environ[ps.MANAGED_ENV] == ""  # not kiln's recorded server: not marked as managed
    assert kiln_logger.level == logging.INFO
    assert refreshed == ([True] if "prefect" in sys.modules else [])


# ------------------------------------------------------------------------------------------ slow

FLOW_SCRIPT = """
import json, logging, sys
from pathlib import Path
from kiln.server.prefect import configure_environment, ensure_server

state = Path(sys.argv[1])
url = ensure_server(state)          # another process: must reuse the running server
configure_environment(url, state)   # before prefect is imported

from prefect import flow, task

@task
def double(x: int) -> int:
    logging.getLogger("kiln.x").info("kiln-probe-line %d", x)
    return 2 * x

@flow(name="kiln-probe")
def probe() -> int:
    return sum(double(i) for i in range(3))

result = probe(return_state=True)
print(json.dumps({"url": url, "flow_run_id": str(result.state_details.flow_run_id), "type": result.type.value}))
"""

QUERY_SCRIPT = """
import asyncio, json, sys, time
from pathlib import Path
from uuid import UUID
from kiln.server.prefect import configure_environment

configure_environment(sys.argv[1], Path(sys.argv[2]))

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

async def main() -> None:
    flow_run_id = UUID(sys.argv[3])
    async with get_client() as client:
        deadline = time.monotonic() + 30   # task runs and logs are ingested asynchronously
        while True:
            run = await client.read_flow_run(flow_run_id)
            tasks = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            logs = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
            done = [t for t in tasks if t.state_type and t.state_type.value == "COMPLETED"]
            probe_logs = [l for l in logs if l.name == "kiln.x"]
            if (len(done) >= 3 and len(probe_logs) >= 3) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    print(json.dumps({
        "flow": {"name": run.name, "state": run.state_type.value if run.state_type else None},
        "tasks": [{"id": str(t.id), "name": t.name, "state": t.state_type.value if t.state_type else None}
                  for t in tasks],
        "logs": [{"name": l.name, "level": l.level, "message": l.message,
                  "task_run_id": str(l.task_run_id) if l.task_run_id else None} for l in logs],
    }))

asyncio.run(main())
"""


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != ps.MANAGED_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _python(script: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=_child_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def local_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    state = tmp_path_factory.mktemp("kiln-state")
    with pytest.MonkeyPatch.context() as mp:
        for key in ("PREFECT_API_URL", ps.MANAGED_ENV):
            mp.delenv(key, raising=False)
        try:
            url = ps.ensure_server(state, port=free_port(), timeout=300)
            yield state, url
        finally:
            ps.stop_server(state)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_api_answers_no_one_without_credentials(local_server: tuple[Path, str]) -> None:
    """Issue 15: the server kiln starts refuses a request without its auth string (401), one with a wrong
    one, and a change without a CSRF token (403); CORS names only its own origin; only the health probe is
    open. kiln's own client (the auth file, 0600 in the 0700 state directory) gets through."""
    state, url = local_server
    auth_file = state / api_http.AUTH_FILE
    assert stat.S_IMODE(auth_file.stat().st_mode) == 0o600 and stat.S_IMODE(state.stat().st_mode) == 0o700
    auth = auth_file.read_text()
    assert auth.startswith("kiln:") and len(auth) > 30

    def raw(method: str, path: str, headers: dict[str, str], body: bytes | None = b"{}") -> tuple[int, dict[str, str]]:
        req = urllib.request.Request(url + path, data=body if method != "GET" else None, method=method,
                                     headers={"Content-Type": "application/json", **headers})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=30) as resp:
                return resp.status, dict(resp.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers)

    basic = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}
    wrong = {"Authorization": "Basic " + base64.b64encode(b"kiln:guess").decode()}
    # the request of the issue: refused (CSRF's check comes first: 403, the auth's: 401)
    assert raw("POST", "/deployments/filter", {})[0] in (401, 403)
    assert raw("GET", "/flow_runs/00000000-0000-0000-0000-000000000000", {})[0] == 401
    assert raw("GET", "/csrf-token?client=stranger", {})[0] == 401  # no token without credentials
    assert raw("GET", "/health", {})[0] == 200  # the probe stays open
    assert raw("POST", "/deployments/filter", basic)[0] == 403  # credentials, but no CSRF token
    # a CSRF token (fetched with the credentials) without them, or with wrong ones: 401
    token = json.loads(urllib.request.build_opener(urllib.request.ProxyHandler({})).open(urllib.request.Request(
        url + "/csrf-token?client=t1", headers=basic), timeout=30).read())["token"]
    csrf = {"Prefect-Csrf-Token": token, "Prefect-Csrf-Client": "t1"}
    assert raw("POST", "/deployments/filter", csrf)[0] == 401
    assert raw("POST", "/deployments/filter", {**csrf, **wrong})[0] == 401
    assert raw("POST", "/deployments/filter", {**csrf, **basic})[0] == 200
    # a page elsewhere may not make a browser talk to the API
    status, headers = raw("OPTIONS", "/deployments/filter", {"Origin": "http://evil.example",
                                                             "Access-Control-Request-Method": "POST"}, None)
    assert headers.get("access-control-allow-origin") in (None, "") and status in (400, 401, 403), (status, headers)
    # kiln's client: credentials and a CSRF token
    assert api_http.api_call(url, "POST", "/deployments/filter", {}, auth=auth)[0] == 200
    assert api_http.api_call(url, "POST", "/deployments/filter", {}, auth="kiln:guess")[0] == 401


@pytest.mark.slow
def test_local_server_end_to_end(local_server: tuple[Path, str]) -> None:
    state, url = local_server
    assert ps.check_health(url)
    status = ps.server_status(state)
    assert status is not None and status["healthy"] and status["url"] == url
    pid = int(status["pid"])
    home = ps.prefect_home(state)
    assert (home / "prefect.db").exists() and (home / "server.log").exists()

    # reuse, in this process and from another one
    assert ps.ensure_server(state) == url
    status2 = ps.server_status(state)
    assert status2 is not None and status2["pid"] == pid

    flow = _python(FLOW_SCRIPT, str(state))
    out = json.loads(flow.stdout.strip().splitlines()[-1])
    assert out["url"] == url
    assert out["type"] == "COMPLETED"
    assert "without a flow run id" not in flow.stderr
    status3 = ps.server_status(state)
    assert status3 is not None and status3["pid"] == pid, "the flow process reused the server"
    assert (home / "results").is_dir() and any((home / "results").iterdir()), "results persisted"

    query = _python(QUERY_SCRIPT, url, str(state), out["flow_run_id"])
    got = json.loads(query.stdout.strip().splitlines()[-1])
    assert got["flow"]["state"] == "COMPLETED"
    assert len(got["tasks"]) == 3
    assert {t["state"] for t in got["tasks"]} == {"COMPLETED"}
    probe = [entry for entry in got["logs"] if entry["name"] == "kiln.x"]
    assert sorted(entry["message"] for entry in probe) == [f"kiln-probe-line {i}" for i in range(3)]
    task_ids = {t["id"] for t in got["tasks"]}
    assert all(entry["task_run_id"] in task_ids for entry in probe), "kiln lines belong to their task run"
    assert all(entry["level"] == logging.INFO for entry in probe)

    # stop: nothing of the server is left
    assert ps.stop_server(state) is True
    assert not ps.pid_alive(pid)
    assert not ps._group_members(pid)
    assert ps.server_status(state) is None
    assert not (home / ps.SERVER_JSON).exists()
    assert not ps.check_health(url)
    assert ps.stop_server(state) is False


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_server_whose_installation_was_removed_is_restarted(clean_env: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    """The real case behind issue 19: kiln's server was started from another virtualenv, since deleted; its
    API still answers from memory. The next kiln restarts it from its own installation, whose UI answers."""
    venv = Path(sys.prefix)
    other = tmp_path / "other-venv"
    (other / "bin").mkdir(parents=True)
    (other / "pyvenv.cfg").write_text((venv / "pyvenv.cfg").read_text())
    (other / "lib").symlink_to(venv / "lib")
    (other / "bin" / "python3").symlink_to(Path(sys.executable).resolve())
    state = tmp_path / "state"
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "executable", str(other / "bin" / "python3"))
            first = ps.ensure_server(state, port=free_port(), timeout=300)
        before = ps.server_status(state)
        assert before is not None and before["python"] == str(other / "bin" / "python3") and before["ui"] == "ok"
        shutil.rmtree(other)  # the other checkout's virtualenv is deleted; its server runs on
        assert ps.check_health(first)
        status = ps.server_status(state)
        assert status is not None and "no longer exists" in status["ui"], status
        again = ps.ensure_server(state, port=free_port(), timeout=300)
        after = ps.server_status(state)
        assert after is not None and after["pid"] != before["pid"] and after["python"] == sys.executable
        assert after["ui"] == "ok" and ps.check_health(again)
        assert not ps.pid_alive(int(before["pid"]))
    finally:
        ps.stop_server(state)


def _recording_server(seen: list[tuple[str, str | None]], redirect_to: str | None = None) -> http.server.HTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.path, self.headers.get("Authorization")))
            if redirect_to:
                self.send_response(302)
                self.send_header("Location", redirect_to)
            else:
                self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_the_api_credentials_go_to_the_api_only(clean_env: pytest.MonkeyPatch) -> None:
    """The auth string from the environment is sent under PREFECT_API_URL and nowhere else, and a redirect
    (which would carry the header to wherever it points) is not followed."""
    elsewhere_seen: list[tuple[str, str | None]] = []
    elsewhere = _recording_server(elsewhere_seen)
    other = f"http://127.0.0.1:{elsewhere.server_port}"
    api_seen: list[tuple[str, str | None]] = []
    api = _recording_server(api_seen, redirect_to=f"{other}/stolen")
    try:
        url = f"http://127.0.0.1:{api.server_port}/api"
        clean_env.setenv("PREFECT_API_URL", url)
        clean_env.setenv(api_http.CLIENT_AUTH_ENV, "kiln:from-the-env")
        api_http.http_get(f"{other}/page", timeout=5)  # not the API: no credentials
        assert elsewhere_seen == [("/page", None)]
        status, _ = api_http.http_get(f"{url}/health", timeout=5)
        assert status == 302 and api_seen[0][1] == "Basic " + base64.b64encode(b"kiln:from-the-env").decode()
        assert [p for p, _ in elsewhere_seen] == ["/page"]  # the redirect was not followed
    finally:
        api.shutdown()
        elsewhere.shutdown()
