"""kiln's deployments on a real Prefect server with real process workers.

One Prefect server on 127.0.0.1 (own database), deployments/prefect.yaml registered as `kiln serve`
does, and two process workers standing in for two build hosts (own store, own host name for the
concurrency limits). The matrix deployment is run through the REST API, as the UI's Run button does.
Takes 3-6 minutes here with warm stores (server start ~35 s, deploy ~15 s, two small cells in parallel);
the first run also bootstraps each store.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_deployments_stack import REPO, PrefectStack, small_matrix, started_stack

pytestmark = pytest.mark.slow
CACHE = os.environ.get("KILN_TEST_CACHE", "/var/tmp/kiln-test/cache")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectStack]:
    with started_stack(tmp_path_factory.mktemp("prefect")) as s:
        yield s


def test_deployments_are_registered_with_schedule_and_typed_form(stack: PrefectStack) -> None:
    nightly = stack.call("GET", "/deployments/name/nightly-refresh/nightly-refresh")
    [schedule] = nightly["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *" and schedule["schedule"]["timezone"] == "UTC"
    assert schedule["active"] is True
    assert nightly["work_queue_name"] == "control"

    build = stack.call("GET", "/deployments/name/build-on-host/build-image")
    assert build["work_queue_name"] == "builds"
    schema = build["parameter_openapi_schema"]
    assert schema["required"] == ["spec"]
    spec_ref = schema["properties"]["spec"]["$ref"].rsplit("/", 1)[-1]
    spec = schema["definitions"][spec_ref]
    for field in ("distro", "release", "arch", "elements", "packages", "size", "formats", "boot_test"):
        assert field in spec["properties"], field
    arch = schema["definitions"][spec["properties"]["arch"]["$ref"].rsplit("/", 1)[-1]]
    assert arch["enum"] == ["amd64", "arm64"]  # a drop-down in the form
    assert spec["properties"]["elements"]["type"] == "array"

    matrix = stack.call("GET", "/deployments/name/build-matrix/build-matrix")
    assert matrix["parameters"]["deployment"] == "build-on-host/build-image"


def test_matrix_cells_run_on_both_workers(stack: PrefectStack, tmp_path: Path) -> None:
    # worker A also serves the control queue (the matrix run itself takes one of its two slots);
    # worker B builds only. With one build slot free on each, the two cells land on both.
    fast = {"PREFECT_WORKER_QUERY_SECONDS": "2"}
    stack.worker("worker-a", queues=("control", "builds"), limit=2, KILN_HOST="host-a",
                 KILN_CACHE=f"{CACHE}-host-a", **fast)
    stack.worker("worker-b", queues=("builds",), limit=1, KILN_HOST="host-b", KILN_CACHE=f"{CACHE}-host-b", **fast)
    matrix = small_matrix(tmp_path / "small.yaml")
    out = tmp_path / "out"
    run_id = stack.run_deployment("build-matrix/build-matrix", {
        "matrix": str(matrix), "output": str(out), "boot_test": False,
        "options": {"elements_path": [str(REPO / "tests/data/elements")]},
    })
    run = stack.wait(run_id, timeout=1800)
    assert run["state_type"] == "COMPLETED", f"{run['state']['message']}\n{stack.log_tail()}"

    cells = stack.child_runs(run_id)
    assert sorted(c["name"] for c in cells) == ["small-debian-bookworm-amd64", "small-debian-trixie-amd64"]
    assert all(c["state_type"] == "COMPLETED" for c in cells)
    workers = {c["labels"].get("prefect.worker.name") for c in cells}
    assert workers == {"worker-a", "worker-b"}, workers

    for name in ("debian-bookworm-amd64", "debian-trixie-amd64"):
        assert (out / name / "manifest.json").is_file()
        assert (out / name / f"{name}.qcow2").is_file()
    summary = next(a for a in stack.artifacts(run_id) if a["key"] == "matrix-small")
    assert "2 of 2 cells built" in summary["data"]
    assert "on worker-a" in summary["data"] and "on worker-b" in summary["data"]
    # each cell held its own host's slots
    logs = "\n".join(stack.logs(cells[0]["id"]) + stack.logs(cells[1]["id"]))
    assert re.search(r"holding 1 cpu, \d+ disk on host-", logs), logs[-2000:]
    for host in ("host-a", "host-b"):
        limit = stack.call("GET", f"/v2/concurrency_limits/kiln-{host}-cpu")
        assert limit["limit"] >= 1 and limit["active_slots"] == 0


@pytest.mark.timeout(1200)
def test_a_run_from_the_api_names_only_allowed_paths_and_takes_secrets_from_blocks(stack: PrefectStack,
                                                                                    tmp_path: Path) -> None:
    """Issue 15: whoever can create a run names its parameters, and the worker runs as root. A run naming
    /etc as its cache, or carrying a secret value, fails naming the field before anything is built; a secret
    the spec takes from a Prefect Secret block reaches the hooks, and never the run's parameters or logs."""
    if not stack.workers:  # alone (-k): the matrix test's workers are not there
        stack.worker("worker-a", queues=("control", "builds"), limit=2, KILN_HOST="host-a",
                     KILN_CACHE=f"{CACHE}-host-a", PREFECT_WORKER_QUERY_SECONDS="2")
    spec = {"name": f"guarded-{os.getpid()}", "elements": ["vm", "small-step"], "size": "2G"}
    out = str(tmp_path / "out")
    refused = {
        "options.cache: /etc is outside": {"spec": spec, "options": {"cache": "/etc", "output": out}},
        "options.output: /etc/cron.d is outside": {"spec": spec, "options": {"output": "/etc/cron.d"}},
        "options.elements_path[0]: /root is outside": {"spec": spec, "options": {"output": out,
                                                                                  "elements_path": ["/root"]}},
        "spec.secrets (KILN_TEST_SECRET)": {"spec": {**spec, "secrets": {"KILN_TEST_SECRET": "typed-in-the-form"}},
                                            "options": {"output": out}},
    }
    for says, parameters in refused.items():
        run = stack.wait(stack.run_deployment("build-on-host/build-image", parameters), timeout=300)
        assert run["state_type"] == "FAILED", (says, run["state"])
        assert says in run["state"]["message"], (says, run["state"]["message"])
    assert not (tmp_path / "out").exists() and not Path("/etc/cron.d/manifest.json").exists()

    # a Secret block, saved with Prefect's own client as an operator would; an element that needs its value
    secret = f"from-a-block-{os.urandom(6).hex()}"
    saved = subprocess.run([sys.executable, "-c", "import sys; from prefect.blocks.system import Secret; "
                            "Secret(value=sys.argv[1]).save('kiln-test-secret', overwrite=True)", secret],
                           env=stack.env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert saved.returncode == 0, saved.stderr[-2000:]
    element = tmp_path / "elements" / "needs-secret"
    (element / "install.d").mkdir(parents=True)
    hook = element / "install.d" / "50-needs-secret"
    hook.write_text(f'#!/bin/bash\nset -eu\nh=$(printf %s "$KILN_TEST_SECRET" | sha256sum)\n'
                    f'[ "${{h%% *}}" = "{hashlib.sha256(secret.encode()).hexdigest()}" ]\necho secret-seen\n')
    hook.chmod(0o755)
    run_id = stack.run_deployment("build-on-host/build-image", {
        "spec": {**spec, "elements": [*spec["elements"], "needs-secret"],
                 "secret_blocks": {"KILN_TEST_SECRET": "kiln-test-secret"}},
        "options": {"output": out, "elements_path": [str(tmp_path / "elements"), str(REPO / "tests/data/elements")],
                    "boot_test": False}})
    run = stack.wait(run_id, timeout=900)
    assert run["state_type"] == "COMPLETED", f"{run['state']['message']}\n{stack.log_tail()}"
    logs = "\n".join(stack.tree_logs(run_id))
    assert "secret-seen" in logs and "KILN_TEST_SECRET from Prefect Secret blocks" in logs
    assert secret not in logs and secret not in json.dumps(stack.flow_run(run_id)["parameters"])
    for child in stack.child_runs(run_id):
        assert secret not in json.dumps(stack.flow_run(child["id"])["parameters"])
    assert secret not in (tmp_path / "out" / "manifest.json").read_text()
