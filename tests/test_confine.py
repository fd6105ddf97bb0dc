"""Hooks outside the chroot (kiln.host.confine and kiln-confine): run for real in a private mount namespace,
they write only into their build's directories, see none of kiln's state (the Prefect API's credentials, the
signing key), no host disk in /dev, and a read-only /proc/sys (issue 15)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kiln.build.plan import HELPERS
from kiln.host.confine import confined_argv

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount namespaces)"),
              pytest.mark.timeout(60)]


def test_an_outside_hook_sees_no_state_no_disks_and_writes_only_its_directories(tmp_path: Path) -> None:
    state, work, elsewhere = tmp_path / "state", tmp_path / "work", tmp_path / "elsewhere"
    for d in (state, work, elsewhere):
        d.mkdir()
    (state / "api-auth").write_text("kiln:secret\n")
    script = (
        f"cat {state}/api-auth 2>/dev/null && echo state=read || echo state=hidden; "
        f"echo x > {work}/made && echo work=written; "
        f"(echo x > {elsewhere}/made) 2>/dev/null && echo elsewhere=written || echo elsewhere=refused; "
        "(echo 1 > /proc/sys/kernel/sysrq) 2>/dev/null && echo sysctl=written || echo sysctl=refused; "
        "echo dev=$(ls /dev | tr '\\n' ,)"
    )
    argv = confined_argv(HELPERS / "outside" / "kiln-confine", ["/bin/bash", "-c", script], writable=[work],
                         hidden=[state])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    out = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    assert out["state"] == "hidden" and "kiln:secret" not in proc.stdout
    assert out["work"] == "written" and (work / "made").exists()
    assert out["elsewhere"] == "refused" and not (elsewhere / "made").exists()
    assert out["sysctl"] == "refused"
    assert out["dev"].rstrip(",").split(",") == sorted(
        ["fd", "full", "null", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty", "urandom", "zero"])
    # and the host is as it was: its /dev, its state directory
    assert (state / "api-auth").read_text() == "kiln:secret\n"
    assert len(os.listdir("/dev")) > 20
