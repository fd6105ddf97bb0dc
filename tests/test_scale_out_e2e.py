"""A fleet on one machine, and a build host that dies mid-build.

- The Prefect server is the fleet's: PostgreSQL-backed (Debian's postgresql), started by
  infra/prefect/server-postgres.sh on a bridge address of a private test network, with a database of
  its own, stopped (and the database dropped) at the end.
- Two build hosts are two network namespaces on that bridge, each with its own worker, store
  (KILN_CACHE), state and host name; a third worker in the root namespace serves the `control` queue
  (the matrix run, which only coordinates). The hosts reach the server and a private Debian archive
  (release, -updates, -security, signed by a throwaway key) on the bridge, and nothing else.
- The matrix's one cell lands on host A (the only builds worker at first); once its bootstrap is under
  way, every process of host A is killed (the host is gone). The server's automation marks the run
  Crashed when its heartbeats stop, the matrix cell starts it again, host B builds it, and the matrix
  run completes. `kiln gc` on host A's store then reclaims what the killed build left.

About 5 minutes here: the server's start, a bootstrap on each host, and the heartbeat timeout.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln.server import api_http, serve
from tests.e2e import REPO, kiln, kiln_env, leftovers
from tests.test_deployments_stack import PrefectStack, free_port
from tests.test_private_mirror_e2e import distribution_debs, publish_suite
from tests.upstream_fixtures import FixtureServer, make_key

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

BRIDGE = "kilnt0"
NET = "10.231.7"  # the test's own private network, on this machine only
HOSTS = {"a": f"{NET}.2", "b": f"{NET}.3"}
RELEASE = "kilnfleet"
SCRIPT = REPO / "infra" / "prefect" / "server-postgres.sh"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check)


@pytest.fixture
def network() -> Iterator[dict[str, str]]:
    """A bridge on this machine ({NET}.1) and a namespace per build host, each with a veth on it."""
    tag = secrets.token_hex(2)
    names = {h: f"kiln-{h}-{tag}" for h in HOSTS}
    sh("ip", "link", "del", BRIDGE, check=False)  # a killed earlier run's
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    try:
        sh("ip", "addr", "add", f"{NET}.1/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for h, ns in names.items():
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", f"kv{h}{tag}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", f"kv{h}{tag}", "master", BRIDGE, "up")
            sh("ip", "-n", ns, "addr", "add", f"{HOSTS[h]}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield names
    finally:
        for ns in names.values():
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                sh("kill", "-9", pid, check=False)
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", BRIDGE, check=False)


@pytest.fixture
def fleet_server(network: dict[str, str], tmp_path: Path) -> Iterator[dict[str, str]]:
    """The PostgreSQL-backed server on the bridge, as infra/prefect/server-postgres.sh starts it."""
    conf = tmp_path / "server"
    env = {**os.environ, "KILN_PREFECT_HOST": f"{NET}.1", "KILN_PREFECT_PORT": str(free_port()),
           "KILN_DB_NAME": f"kiln_test_{secrets.token_hex(3)}", "KILN_PREFECT_ENV": str(conf / "prefect-server.env"),
           "KILN_PREFECT_HOME": str(conf / "home"), "KILN_PREFECT_LOG": str(conf / "server.log"),
           "KILN_VENV": str(REPO / ".venv")}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    url = proc.stdout.strip().splitlines()[-1]
    try:
        yield {"url": url, "env_file": env["KILN_PREFECT_ENV"], "db": env["KILN_DB_NAME"]}
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
        sh("runuser", "-u", "postgres", "--", "dropdb", "--if-exists", env["KILN_DB_NAME"], check=False)
        sh("runuser", "-u", "postgres", "--", "psql", "-qc", f'DROP ROLE IF EXISTS "{env["KILN_DB_NAME"]}"',
           check=False)


def _archive(root: Path, key: Any, installed: list[dict[str, Any]]) -> Path:
    debs = Path(kiln_env()["KILN_CACHE"]) / "debs" / "debian-amd64"
    archive = root / "archive"
    pool = archive / "pool" / "main"
    pool.mkdir(parents=True)
    for deb in distribution_debs(debs, installed):
        os.link(deb, pool / deb.name)
    publish_suite(archive, RELEASE, "main", key, components=("main",))
    for pocket in ("updates", "security"):
        publish_suite(archive, f"{RELEASE}-{pocket}", None, key, components=("main",))
    return archive


def _cell_run(stack: PrefectStack, matrix_run: str) -> dict[str, Any] | None:
    runs = stack.child_runs(matrix_run)
    return runs[0] if runs else None


def test_a_cell_whose_host_dies_mid_build_is_finished_by_another_host(
        seed_build: tuple[Path, dict[str, Any], float],
        network: dict[str, str], fleet_server: dict[str, str], tmp_path: Path) -> None:
    url = fleet_server["url"]
    assert url.startswith(f"http://{NET}.1:")
    assert f"{fleet_server['db']}" in Path(fleet_server["env_file"]).read_text()
    assert oct(Path(fleet_server["env_file"]).stat().st_mode & 0o777) == "0o600"

    key = make_key(tmp_path / "key", "kiln fleet archive")
    mirror = FixtureServer(_archive(tmp_path, key, seed_build[1]["packages"]), host=f"{NET}.1")
    # the fleet's server answers only with the credentials its env file holds (issue 15)
    auth = next(line.split("=", 1)[1] for line in Path(fleet_server["env_file"]).read_text().splitlines()
                if line.startswith("PREFECT_SERVER_API_AUTH_STRING="))
    assert api_http.http_get(f"{url}/admin/version", timeout=30, auth="kiln:guess")[0] == 401
    assert serve.api(url, "POST", "/deployments/filter", {}, auth="kiln:guess")[0] in (401, 403)  # CSRF first
    stack = PrefectStack(tmp_path / "fleet")
    stack.url, stack.auth = url, auth
    api_http.register(url, auth)
    try:
        stack.deploy()
        quick = {"PREFECT_WORKER_QUERY_SECONDS": "2"}
        stack.worker("controller", queues=("control",), **quick)
        hosts = {h: {"KILN_HOST": f"host-{h}", "KILN_CACHE": str(tmp_path / f"cache-{h}"),
                     "KILN_STATE": str(tmp_path / f"state-{h}"), **quick} for h in HOSTS}
        stack.worker("worker-a", queues=("builds",), limit=1, launcher=("ip", "netns", "exec", network["a"]),
                     **hosts["a"])

        matrix = tmp_path / "fleet.yaml"
        matrix.write_text(json.dumps({
            "name": "fleet", "cell_name": "fleet-{release}",
            "base": {"distro": "debian", "elements": ["vm"], "size": "2G", "formats": ["raw"],
                     "mirror": mirror.url("").rstrip("/"), "security_mirror": mirror.url("").rstrip("/"),
                     "mirror_keyring": str(key.keyring)},
            "axes": {"release": [RELEASE]},
        }))
        out = tmp_path / "out"
        run_id = stack.run_deployment("build-matrix/build-matrix", {
            "matrix": str(matrix), "output": str(out), "boot_test": False,
            "deployment": "build-on-host/build-image"})

        # the cell starts on host A; kill host A once its bootstrap is under way
        deadline = time.monotonic() + 600
        first: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            first = _cell_run(stack, run_id)
            if first and any("bootstrapping debian" in line for line in stack.tree_logs(first["id"])):
                break
            time.sleep(2)
        assert first is not None, f"no cell run started\n{stack.log_tail()}"
        assert first["labels"].get("prefect.worker.name") == "worker-a", first["labels"]
        stack.worker("worker-b", queues=("builds",), limit=1, launcher=("ip", "netns", "exec", network["b"]),
                     **hosts["b"])
        killed = sh("ip", "netns", "pids", network["a"]).stdout.split()
        assert killed
        for pid in killed:
            sh("kill", "-9", pid, check=False)

        run = stack.wait(run_id, timeout=1200)
        assert run["state_type"] == "COMPLETED", f"{run['state']['message']}\n{stack.log_tail()}"
        crashed = stack.flow_run(first["id"])
        assert crashed["state_type"] == "CRASHED", crashed["state"]
        assert "no heartbeat" in (crashed["state"]["message"] or "")
        cells = stack.child_runs(run_id)
        finished = [c for c in cells if c["state_type"] == "COMPLETED"]
        assert [c["labels"].get("prefect.worker.name") for c in finished] == ["worker-b"], cells
        assert finished[0]["name"].endswith("-retry1")
        manifest = json.loads((out / f"fleet-{RELEASE}" / "manifest.json").read_text())
        assert manifest["base"]["mirror"] == mirror.url("").rstrip("/")
        logs = "\n".join(stack.logs(run_id))
        assert "crashed" in logs and "building it again" in logs, logs[-3000:]

        # host A comes back: kiln gc reclaims what its killed build left in its store
        gc = kiln("gc", env={**kiln_env(), "KILN_CACHE": hosts["a"]["KILN_CACHE"]})
        assert "Traceback" not in gc.stderr
        assert leftovers(hosts["a"]["KILN_CACHE"]) == [] and leftovers(hosts["b"]["KILN_CACHE"]) == []
    finally:
        for w in stack.workers:
            serve.stop_worker(w, grace=10)
        stack.workers.clear()
        mirror.close()
        key.stop()
