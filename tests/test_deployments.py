"""kiln's deployments on a real Prefect server with real process workers.

One Prefect server on 127.0.0.1 (own database), deployments/prefect.yaml registered as `kiln serve`
does, and two process workers standing in for two build hosts (own store, own host name for the
concurrency limits). The matrix deployment is run through the REST API, as the UI's Run button does.
Takes 3-6 minutes here with warm stores (server start ~35 s, deploy ~15 s, two small cells in parallel);
the first run also bootstraps each store.
"""

from __future__ import annotations

import os
import re
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
