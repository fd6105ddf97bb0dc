"""Cancelling a real build from the API (what the UI's Cancel button and `prefect flow-run cancel` do).

A build-image run on a real process worker is cancelled while apt installs packages in the chroot; the
worker then SIGTERMs the run's process group. Within the worker's grace period the run must be
Cancelled, no process of the build may survive (apt/dpkg in the chroot, hooks, QEMU) and none of its
mounts may remain. About 3-4 minutes here (server, deploy, the build up to its package step).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_deployments_stack import REPO, PrefectStack

pytestmark = pytest.mark.slow
CACHE = os.environ.get("KILN_TEST_CACHE", "/var/tmp/kiln-test/cache") + "-cancel"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectStack]:
    s = PrefectStack(tmp_path_factory.mktemp("prefect-cancel"))
    try:
        s.start()
        s.deploy()
        s.worker("cancel-worker", KILN_CACHE=CACHE, PREFECT_WORKER_QUERY_SECONDS="2")
        yield s
    finally:
        s.stop()


def build_processes(workdir_root: Path) -> dict[int, str]:
    """Processes working for a build under `workdir_root`: chrooted into it, or naming it on their command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            root = os.readlink(f"/proc/{entry}/root")
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            continue
        if root.startswith(str(workdir_root)) or str(workdir_root) in cmd:
            found[int(entry)] = cmd.strip()[:160]
    return found


def mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        return [line.split()[4] for line in fh if line.split()[4].startswith(str(path))]


def test_cancel_during_package_install_stops_everything(stack: PrefectStack, tmp_path: Path) -> None:
    nonce = uuid.uuid4().hex[:8]  # a new environment: every hook and the package step run for real
    run_id = stack.run_deployment("build-on-host/build-image", {
        "spec": {"name": "cancel-me", "elements": ["vm", "small-step"], "size": 2 * 1024**3,
                 "env": {"DIB_NONCE": nonce}},
        "options": {"output": str(tmp_path / "out"), "boot_test": False,
                    "elements_path": [str(REPO / "tests/data/elements")]},
    })
    work = Path(CACHE) / "work"
    deadline = time.monotonic() + 900
    while not any("running install.d/01-package-installs" in m for m in stack.tree_logs(run_id)):
        run = stack.flow_run(run_id)
        assert run["state_type"] in ("SCHEDULED", "PENDING", "RUNNING"), f"{run['state']}\n{stack.log_tail()}"
        assert time.monotonic() < deadline, "the package step never started"
        time.sleep(1)
    time.sleep(4)  # apt is unpacking now
    before = build_processes(work)
    assert any("chroot" in c or "apt" in c or "dpkg" in c for c in before.values()), before
    assert mounts_under(work), "the chroot's mounts are up"

    cancelled_at = time.monotonic()
    stack.call("POST", f"/flow_runs/{run_id}/set_state", {"state": {"type": "CANCELLING", "name": "Cancelling"}})
    run = stack.wait(run_id, timeout=120, states={"CANCELLED", "COMPLETED", "FAILED", "CRASHED"})
    took = time.monotonic() - cancelled_at
    # give whatever kiln does on SIGTERM a moment to finish, well inside the worker's 30 s grace
    deadline = time.monotonic() + 45
    while (build_processes(work) or mounts_under(work)) and time.monotonic() < deadline:
        time.sleep(1)
    left_processes = build_processes(work)
    left_mounts = mounts_under(work)
    print(f"cancelled in {took:.1f} s; state {run['state_type']}; processes before: {len(before)}; "
          f"left: {left_processes}; mounts left: {left_mounts}")
    assert run["state_type"] == "CANCELLED", run["state"]
    assert left_processes == {}, f"processes of the cancelled build still run: {left_processes}"
    assert left_mounts == [], f"mounts of the cancelled build remain: {left_mounts}"
