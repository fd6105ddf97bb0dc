"""`kiln serve`: the Prefect server, the `kiln` work pool, kiln's deployments and a process worker.

    ensure_server (kiln's local server, or the PREFECT_API_URL you set)
    -> work pool `kiln` (process) with the queues `builds` and `control`     (REST API)
    -> the automation that marks a run Crashed when its heartbeats stop     (REST API)
    -> deployments/prefect.yaml registered                                   (`prefect deploy --all`)
    -> `prefect worker start` on this host, in the foreground until Ctrl-C or SIGTERM

The same pieces start a fleet's workers (infra/prefect/). Like kiln/server/prefect.py this module does
not import Prefect: it talks to the server's REST API and runs Prefect's own command line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.host.run import run, spawn
from kiln.model.errors import ServerError
from kiln.server.api_http import api_call

log = logging.getLogger("kiln.serve")

REPO = Path(__file__).resolve().parents[2]
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
POOL = "kiln"
QUEUES = ("builds", "control")
DEPLOYMENTS = ("build-on-host/build-image", "build-matrix/build-matrix", "nightly-refresh/nightly-refresh")
WORKER_STOP_GRACE = 40.0  # the worker gives its runs 30 s after SIGTERM before it kills them
# Flow runs started by kiln's workers send a heartbeat this often (seconds; Prefect's minimum is 30) ...
HEARTBEAT_SECONDS = 30
# ... and one that has sent none for this long is marked Crashed by the server's automation below: its host
# died or its process was killed. A matrix cell whose run crashed so is built again on another worker.
ZOMBIE_AFTER_SECONDS = 90
ZOMBIE_AUTOMATION = "kiln: crash flow runs whose host went silent"


def api(api_url: str, method: str, path: str, body: Mapping[str, Any] | None = None, *,
        timeout: float = 30.0, attempts: int = 5, auth: str | None = None) -> tuple[int, Any]:
    """One call of the Prefect REST API (kiln.server.api_http): (HTTP status, decoded JSON or None).

    A 503 (a young server on SQLite answers so while its database is busy) is retried with backoff."""
    for attempt in range(attempts):
        status, answer = api_call(api_url, method, path, body, timeout=timeout, auth=auth)
        # 403: a CSRF token expired (api_call forgot it; the next attempt fetches a fresh one)
        if status not in (503, 403) or attempt + 1 == attempts or (status == 403 and attempt > 0):
            return status, answer
        time.sleep(0.5 * 2**attempt)
    return status, answer


def ensure_work_pool(api_url: str, pool: str = POOL, queues: Sequence[str] = QUEUES) -> None:
    """The process work pool `pool` and its queues, created when missing (an existing pool is kept)."""
    status, body = api(api_url, "POST", "/work_pools/", {"name": pool, "type": "process"})
    if status not in (200, 201, 409):
        raise ServerError(f"cannot create the work pool {pool!r}: HTTP {status}: {body}")
    if status != 409:
        log.info("created the process work pool %r", pool)
    for queue in queues:
        status, body = api(api_url, "POST", f"/work_pools/{urllib.parse.quote(pool)}/queues", {"name": queue})
        if status not in (200, 201, 409):
            raise ServerError(f"cannot create the work queue {queue!r} of pool {pool!r}: HTTP {status}: {body}")


def ensure_zombie_automation(api_url: str, *, within: int = ZOMBIE_AFTER_SECONDS) -> None:
    """The server's automation that marks a flow run Crashed once its heartbeats stop (Prefect's recipe for
    zombie flow runs): without it, the run of a build host that died stays Running forever and its matrix
    cell never ends. Created when missing; an existing one (by name) is kept."""
    status, found = api(api_url, "POST", "/automations/filter",
                        {"automations": {"name": {"any_": [ZOMBIE_AUTOMATION]}}})
    if status == 200 and any(a.get("name") == ZOMBIE_AUTOMATION for a in found or []):
        return
    body = {
        "name": ZOMBIE_AUTOMATION,
        "description": "kiln's workers start flow runs that send a heartbeat every "
                       f"{HEARTBEAT_SECONDS} s; one silent for {within} s is marked Crashed",
        "enabled": True,
        "trigger": {
            "type": "event", "posture": "Proactive", "threshold": 1, "within": within,
            "after": ["prefect.flow-run.heartbeat"],
            "expect": ["prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                       "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"],
            "match": {"prefect.resource.id": ["prefect.flow-run.*"]},
            "for_each": ["prefect.resource.id"],
        },
        "actions": [{"type": "change-flow-run-state", "state": "CRASHED",
                     "message": f"no heartbeat for {within} s: the build host died or the run's process was killed"}],
    }
    status, answer = api(api_url, "POST", "/automations/", body)
    if status not in (200, 201):
        raise ServerError(f"cannot create the automation {ZOMBIE_AUTOMATION!r}: HTTP {status}: {answer}")
    log.info("created the automation %r", ZOMBIE_AUTOMATION)


def worker_environment(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with what kiln's workers need: heartbeats from the flow runs they start."""
    return {**env, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": env.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY",
                                                                str(HEARTBEAT_SECONDS))}


def register_deployments(env: Mapping[str, str], prefect_file: Path = PREFECT_FILE) -> None:
    """`prefect deploy --all` of kiln's deployments, from the repository root (the runs' working directory)."""
    run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)],
        env=env, cwd=REPO, timeout=300, quiet=True, what="registering kiln's deployments (prefect deploy)")


def deployments(api_url: str) -> dict[str, dict[str, Any]]:
    """The server's deployments, by `flow/deployment` name."""
    status, flows = api(api_url, "POST", "/flows/filter", {})
    status2, deps = api(api_url, "POST", "/deployments/filter", {})
    if status != 200 or status2 != 200:
        raise ServerError(f"cannot list deployments: HTTP {status}/{status2}")
    names = {f["id"]: f["name"] for f in flows}
    return {f"{names.get(d['flow_id'], '?')}/{d['name']}": d for d in deps}


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    queues: tuple[str, ...] = field(default_factory=tuple)


def worker_argv(pool: str, name: str, queues: Sequence[str], limit: int | None) -> list[str]:
    argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process", "--name", name]
    for queue in queues:
        argv += ["--work-queue", queue]
    if limit is not None:
        argv += ["--limit", str(limit)]
    return argv


def start_worker(env: Mapping[str, str], *, pool: str = POOL, name: str | None = None,
                 queues: Sequence[str] = QUEUES, limit: int | None = None, log_dir: Path,
                 launcher: Sequence[str] = ()) -> Worker:
    """A `prefect worker start` in its own process group, its output in `<log_dir>/worker-<name>.log`.

    Its flow runs start in the repository (the deployments' working directory) with its environment,
    so give it what builds need: PREFECT_API_URL, KILN_CACHE, KILN_STATE, DIB_* … `launcher` runs it
    under another command (e.g. `ip netns exec NS`, `nice -n 5`)."""
    name = name or f"kiln-{socket.gethostname().split('.')[0]}"
    log_dir.mkdir(parents=True, exist_ok=True)
    logfile = log_dir / f"worker-{name}.log"
    try:
        proc = spawn([*launcher, *worker_argv(pool, name, queues, limit)], log_file=logfile,
                     env=worker_environment(env), cwd=REPO)
    except OSError as exc:
        raise ServerError(f"cannot start worker {name} ({launcher[0] if launcher else 'prefect'}): "
                          f"{exc.strerror}") from exc
    log.info("started worker %s (pid %d) on pool %s, queues %s; log %s", name, proc.pid, pool, ",".join(queues),
             logfile)
    return Worker(name, proc, logfile, tuple(queues))


def wait_worker_ready(worker: Worker, api_url: str, pool: str = POOL, timeout: float = 120.0) -> None:
    """Until the server lists `worker` as online in `pool` (its first heartbeat)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            tail = worker.log.read_text(errors="replace").splitlines()[-20:]
            raise ServerError(f"worker {worker.name} exited with {worker.proc.returncode}:\n  " + "\n  ".join(tail))
        status, body = api(api_url, "POST", f"/work_pools/{urllib.parse.quote(pool)}/workers/filter", {})
        if status == 200 and any(w["name"] == worker.name and w.get("status") == "ONLINE" for w in body):
            return
        time.sleep(1.0)
    raise ServerError(f"worker {worker.name} did not come online within {timeout:.0f} s (log {worker.log})")


def stop_worker(worker: Worker, grace: float = WORKER_STOP_GRACE) -> None:
    """SIGTERM the worker's group (it cancels and waits for its runs), SIGKILL what is left after `grace`."""
    pgid = worker.proc.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    try:
        worker.proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log.warning("worker %s ignored SIGTERM for %.0f s; killing it", worker.name, grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker.proc.wait(timeout=10)


def how_to_use(ui_url: str, api_url: str, auth_file: Path | None = None) -> str:
    port = urllib.parse.urlparse(ui_url).port or 4200
    login = (f"\n  It asks for credentials once: type the content of {auth_file} (kiln:…; root may read it).\n"
             f"  Other clients: PREFECT_API_AUTH_STRING=\"$(cat {auth_file})\"") if auth_file else ""
    return f"""
kiln serve: the Prefect UI is at {ui_url}
  (from another machine: ssh -L {port}:127.0.0.1:{port} THIS-HOST, then open http://127.0.0.1:{port}){login}

  Deployments -> build-image -> Run -> Custom run: the form has the image spec (distro, release, arch,
      elements, packages, size, formats, boot test) and the build options (output directory, cache…)
  Deployments -> nightly-refresh: images/nightly.yaml every night at 02:00 UTC (Run -> Quick run: now)
  Deployments -> build-matrix: any matrix file, cells spread over the workers

  From a shell:  PREFECT_API_URL={api_url} prefect deployment run build-matrix/build-matrix \\
                     --param only='["arch=amd64"]' --param boot_test=false
  Cancel a run:  its page -> Cancel, or  prefect flow-run cancel RUN-ID
Ctrl-C stops the worker (the server keeps running: `kiln server stop`).
"""
