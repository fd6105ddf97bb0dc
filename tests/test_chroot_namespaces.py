"""Hooks run in PID and mount namespaces of their own, over a /dev of kiln's (issue 15): a real chroot into a
small tree made of this host's own shell and tools (copied with their libraries), no mocks."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from kiln.host.chroot import ChrootSession
from kiln.host.mounts import mounted_targets

TOOLS = ("sh", "sleep", "cat", "readlink")


def _tree(root: Path) -> Path:
    """`root` with /bin/{sh,sleep,cat,readlink} from this host and the libraries they load."""
    for d in ("bin", "etc", "usr/sbin", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for tool in TOOLS:
        path = Path(shutil.which(tool) or f"/bin/{tool}").resolve()
        shutil.copy2(path, root / "bin" / tool)
        for line in subprocess.run(["ldd", str(path)], capture_output=True, text=True).stdout.splitlines():
            lib = next((w for w in line.split() if w.startswith("/")), None)
            if lib:
                dest = root / lib.lstrip("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                if not dest.exists():
                    shutil.copy2(Path(lib).resolve(), dest)
    return root


@pytest.mark.timeout(60)
def test_a_hook_sees_its_own_processes_and_devices_and_leaves_nothing_running(tmp_path: Path) -> None:
    root = _tree(tmp_path / "root")
    marker = f"kiln-daemon-{os.getpid()}"
    shutil.copy2(root / "bin/sleep", root / "bin" / marker)
    script = (
        # a daemon a package would start, detached and still running when the hook ends
        f"({marker} 1000 &) ; "
        "echo pid=$$; "
        "n=0; for p in /proc/[0-9]*; do n=$((n+1)); done; echo procs=$n; "
        "d=; for f in /dev/*; do d=$d${f#/dev/},; done; echo dev=$d; "
        "(echo 1 > /proc/sys/kernel/sysrq) 2>/dev/null && echo sysctl=written || echo sysctl=refused; "
        "cat /dev/vda >/dev/null 2>&1 && echo disk=read || echo disk=none; "
        "echo fd=$(readlink /dev/fd)"
    )
    with ChrootSession(root, tmp_path / "journal") as session:
        result = session.run(["/bin/sh", "-c", script], env={"PATH": "/bin"}, timeout=30)
    out = dict(line.split("=", 1) for line in result.lines if "=" in line)
    assert out["pid"] == "1"  # the hook is the first process of its own PID namespace
    assert int(out["procs"]) <= 3, out  # itself, the daemon, the subshell of $(…): none of the host's
    assert out["dev"].rstrip(",").split(",") == sorted(
        ["fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty", "urandom",
         "zero"]), out["dev"]
    assert out["sysctl"] == "refused" and out["disk"] == "none" and out["fd"] == "/proc/self/fd"
    # the daemon died with the hook: nothing on the host carries its name
    deadline = time.monotonic() + 5
    while subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the hook's daemon outlived it"
        time.sleep(0.1)
    # and the session left no mount behind, nor anything in the tree
    assert not [t for t in mounted_targets() if t.startswith(str(root))]
    assert not (root / "dev").exists() or not any((root / "dev").iterdir())
