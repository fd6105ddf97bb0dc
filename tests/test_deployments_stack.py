"""A real Prefect stack for the deployment, cancellation and UI tests (this module has no tests itself).

A Prefect server on 127.0.0.1 with its own database (started by kiln's own `ensure_server`, on a free
port), the `kiln` work pool with kiln's deployments registered from deployments/prefect.yaml exactly as
`kiln serve` does, and process workers (`kiln.server.serve.start_worker`), each with its own environment so
that two workers on this machine can stand in for two build hosts (own KILN_CACHE, own KILN_HOST).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kiln.server import api_http, serve
from kiln.server import prefect as prefect_server

REPO = Path(__file__).resolve().parent.parent
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PrefectStack:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / "state"
        self.url = ""
        self.auth: str | None = None  # a server kiln did not start (the fleet's): its credentials
        self.workers: list[serve.Worker] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> str:
        self.url = prefect_server.ensure_server(self.state, port=free_port(), timeout=300)
        return self.url

    @property
    def ui_url(self) -> str:
        return self.url.removesuffix("/api")

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(prefect_server.client_environment(self.url, self.state))
        if self.auth:
            env[api_http.CLIENT_AUTH_ENV] = self.auth
        env.setdefault("KILN_CACHE", os.environ.get("KILN_TEST_CACHE", "/var/tmp/kiln-test/cache"))
        env["PYTHONUNBUFFERED"] = "1"
        # the test's output directories (under pytest's base temporary directory): runs from a deployment may
        # name host paths only under the worker's checkout, its cache and these (kiln.model.hostpaths)
        env["KILN_ALLOWED_PATHS"] = f"{self.root.parent}:{REPO / 'tests' / 'data'}"
        env.update(extra)
        return env

    def deploy(self) -> dict[str, dict[str, Any]]:
        serve.ensure_work_pool(self.url)
        serve.ensure_zombie_automation(self.url)
        serve.register_deployments(self.env())
        return serve.deployments(self.url)

    def worker(self, name: str, *, queues: tuple[str, ...] = serve.QUEUES, limit: int | None = None,
               launcher: tuple[str, ...] = (), **env: str) -> serve.Worker:
        w = serve.start_worker(self.env(**env), name=name, queues=queues, limit=limit, log_dir=self.root / "logs",
                               launcher=launcher)
        self.workers.append(w)
        serve.wait_worker_ready(w, self.url)
        return w

    def stop(self) -> None:
        """Workers first (they cancel their runs), then the server."""
        for w in self.workers:
            serve.stop_worker(w)
        self.workers.clear()
        prefect_server.stop_server(self.state)

    # ------------------------------------------------------------------ API

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        status, data = serve.api(self.url, method, path, body)
        assert status in (200, 201, 204), f"{method} {path}: HTTP {status}: {data}"
        return data

    def run_deployment(self, name: str, parameters: dict[str, Any]) -> str:
        """Create a run of `flow/deployment` with `parameters` (as the UI's Run button does); its id."""
        flow_name, dep_name = name.split("/")
        dep = self.call("GET", f"/deployments/name/{urllib.parse.quote(flow_name)}/{urllib.parse.quote(dep_name)}")
        run = self.call("POST", f"/deployments/{dep['id']}/create_flow_run", {"parameters": parameters})
        return str(run["id"])

    def flow_run(self, run_id: str) -> dict[str, Any]:
        data: dict[str, Any] = self.call("GET", f"/flow_runs/{run_id}")
        return data

    def wait(self, run_id: str, timeout: float, *, states: set[str] = TERMINAL) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            run = self.flow_run(run_id)
            if run["state_type"] in states:
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"run {run_id} still {run['state_type']} after {timeout:.0f} s\n{self.log_tail()}")
            time.sleep(2)

    def logs(self, run_id: str) -> list[str]:
        out: list[str] = []
        offset = 0
        while True:
            page = self.call("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}},
                                                       "sort": "TIMESTAMP_ASC", "limit": 200, "offset": offset})
            out += [entry["message"] for entry in page]
            if len(page) < 200:
                return out
            offset += 200

    def tree_logs(self, run_id: str) -> list[str]:
        """The logs of `run_id` and of the flow runs it started (a build's lines are in its subflow's)."""
        out = self.logs(run_id)
        for child in self.child_runs(run_id):
            out += self.tree_logs(child["id"])
        return out

    def child_runs(self, parent_run_id: str) -> list[dict[str, Any]]:
        """Flow runs started by `parent_run_id`'s tasks (subflows and `run_deployment` runs)."""
        tasks = self.call("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [parent_run_id]}}})
        ids = [t["id"] for t in tasks]
        if not ids:
            return []
        runs: list[dict[str, Any]] = self.call("POST", "/flow_runs/filter",
                                               {"flow_runs": {"parent_task_run_id": {"any_": ids}}})
        return runs

    def artifacts(self, run_id: str) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self.call("POST", "/artifacts/filter",
                                               {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
        return data

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for w in self.workers:
            text = w.log.read_text(errors="replace").splitlines()[-lines:] if w.log.exists() else []
            parts.append(f"--- worker {w.name}\n" + "\n".join(text))
        return "\n".join(parts)


@contextlib.contextmanager
def started_stack(root: Path) -> Iterator[PrefectStack]:
    """A PrefectStack started with kiln's deployments registered; stopped (workers first) afterwards."""
    stack = PrefectStack(root)
    try:
        stack.start()
        stack.deploy()
        yield stack
    finally:
        stack.stop()


def small_matrix(path: Path, releases: tuple[str, ...] = ("bookworm", "trixie")) -> Path:
    """A cheap matrix: the small test image (vm and one tiny hook) for amd64."""
    path.write_text(json.dumps({
        "name": "small",
        "base": {"elements": ["vm", "small-step"], "size": "2G", "boot_test": {"firmware": ["bios"]}},
        "axes": {"release": list(releases), "arch": ["amd64"]},
    }))
    return path
