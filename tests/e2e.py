"""Helpers for the end-to-end tests: run the real `kiln` command, look for leftovers."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
KILN = [sys.executable, "-m", "kiln.cli"]


def kiln_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("KILN_CACHE", os.environ.get("KILN_TEST_CACHE", "/var/tmp/kiln-test/cache"))
    env.setdefault("KILN_STATE", os.environ.get("KILN_TEST_STATE", "/var/tmp/kiln-test/state"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def kiln(*args: str, timeout: float = 3000, check: bool = True, env: dict[str, str] | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*KILN, *args], env=env or kiln_env(), cwd=cwd or REPO, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"kiln {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def manifest(output: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((output / "manifest.json").read_text())
    return data


# the directories this test session made (its pytest base temp, set by conftest): leftovers() looks at what
# lies under them and under the test store, never at another process's mounts, loop devices or guests
SESSION_ROOTS: list[str] = []


def leftovers(cache: str | None = None) -> list[str]:
    """The mounts, loop devices and kiln QEMU processes of this test session still on the machine: those
    under the test store (`cache`) or the session's temporary directories."""
    roots = [cache or kiln_env()["KILN_CACHE"], *SESSION_ROOTS]

    def ours(text: str) -> bool:
        return any(root and root in text for root in roots)

    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            target = line.split()[4]
            if any(target.startswith(root) for root in roots):
                found.append(f"mount {target}")
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.splitlines()
    found += [f"loop device: {line}" for line in loops if ours(line)]
    # kiln's boot tests name their QEMU kiln-boot-*; a cloud's own guests (libvirt, Nova) are not kiln's
    for line in subprocess.run(["pgrep", "-af", "qemu-system.*-name kiln-boot"], capture_output=True,
                               text=True).stdout.splitlines():
        # a dead QEMU whose reaper (PID 1 here) never waits for it is not running
        if ours(line) and not _zombie(int(line.split()[0])):
            found.append(f"qemu: {line}")
    return found


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@contextlib.contextmanager
def started_by_us(status: list[str], up: list[str], down: list[str], *, timeout: float,
                  down_timeout: float = 300) -> Iterator[str]:
    """Run `up` (its last output line is the result); afterwards run `down` unless `status` said the
    service was already up before (a developer's running stack stays running)."""
    from kiln.host.run import run

    was_running = run(status, check=False, quiet=True).returncode == 0
    result = run(up, quiet=True, timeout=timeout, what=up[0])
    try:
        yield result.lines[-1].strip()
    finally:
        if not was_running and not os.environ.get("KILN_TEST_KEEP_INFRA"):
            run(down, check=False, quiet=True, timeout=down_timeout)
