"""Faults, end to end: a build SIGKILLed in each stage, a full disk, a corrupted cache entry, a secret.

Every case ends with no mount, loop device or QEMU process of kiln's left and a cache that a clean
build trusts. SIGKILL goes to kiln's own process only (as the OOM killer would): its children are
left to `kiln gc`, which must find and kill them through the build's journal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from kiln.server import api_http
from tests.e2e import KILN, REPO, kiln, kiln_env, leftovers, manifest

pytestmark = pytest.mark.slow
SMALL = ["tests/data/small.yaml", "--elements-path", "tests/data/elements"]


def kill_when(args: list[str], marker: str, *, delay: float, env: dict[str, str] | None = None,
              timeout: float = 900) -> str:
    """Start `kiln ARGS`, SIGKILL it `delay` seconds after `marker` appears in its output."""
    proc = subprocess.Popen([*KILN, *args], env=env or kiln_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                time.sleep(delay)
                os.kill(proc.pid, signal.SIGKILL)
                break
            if time.monotonic() > deadline:
                break
        else:
            pytest.fail(f"{marker!r} never appeared:\n{''.join(seen[-40:])}")
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-40:])
    return "".join(seen)


def gc_and_check(env: dict[str, str] | None = None) -> str:
    out = kiln("gc", check=True, env=env).stdout
    cache = Path((env or kiln_env())["KILN_CACHE"])
    assert leftovers(str(cache)) == []
    assert list((cache / "tmp").iterdir()) == []
    assert not (cache / "work").exists() or list((cache / "work").iterdir()) == []
    return out


@pytest.mark.parametrize("stage,marker,extra,delay", [
    ("package install", "running install.d/01-package-installs", ["--env", "DIB_FAULT_NONCE=pkg"], 6.0),
    ("hook", "running install.d/60-small-step", ["--env", "KILN_TEST_SLEEP=30"], 2.0),
    ("pack", "packing small", ["--env", "DIB_FAULT_NONCE=pack"], 0.5),
    ("boot test", "boot test amd64/bios", ["--env", "DIB_FAULT_NONCE=boot"], 8.0),
])
def test_sigkill_in_a_stage_then_gc_then_clean_rebuild(stage: str, marker: str, extra: list[str], delay: float,
                                                      tmp_path: Path) -> None:
    # a fresh nonce in the spec's env: every step from the package install on is new, so the stage to be
    # killed really runs (a cache warm from an earlier run would skip it)
    extra = [*extra, "--env", f"KILN_TEST_NONCE={os.urandom(4).hex()}"]
    boot = [] if stage == "boot test" else ["--no-boot-test"]
    if stage == "pack":
        kiln("build", *SMALL, *extra, "--no-boot-test", "--output", str(tmp_path / "warm"),
             "--size", "3G")  # layers cached, so the kill lands in pack
        extra = [*extra, "--size", f"{2048 + int.from_bytes(os.urandom(2), 'big') % 1000}M"]  # never packed before
    kill_when(["build", *SMALL, *extra, *boot, "--output", str(tmp_path / "killed")], marker, delay=delay)
    out = gc_and_check()
    assert "reclaimed" in out, out
    kiln("build", *SMALL, *extra, "--no-boot-test", "--output", str(tmp_path / "after"))
    assert (tmp_path / "after" / "manifest.json").exists()
    assert leftovers() == []


def test_sigkill_during_bootstrap_on_a_cold_cache(tmp_path: Path) -> None:
    env = {**kiln_env(), "KILN_CACHE": str(tmp_path / "cold-cache")}
    kill_when(["build", *SMALL, "--no-boot-test", "--output", str(tmp_path / "killed")], "bootstrapping debian",
              delay=4.0, env=env)
    gc_and_check(env)
    assert [e for e in (tmp_path / "cold-cache" / "entries").iterdir()] == []  # nothing half-written trusted


def test_full_disk_fails_the_stage_cleanly(tmp_path: Path) -> None:
    small_fs = tmp_path / "small-fs"
    small_fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700m", "kiln-test-full", str(small_fs)], check=True)
    try:
        env = {**kiln_env(), "KILN_CACHE": str(small_fs / "cache")}
        proc = kiln("build", *SMALL, "--no-boot-test", "--output", str(tmp_path / "out"), check=False, env=env)
        assert proc.returncode != 0
        err = proc.stderr
        assert "No space left on device" in err or "not enough" in err.lower(), err[-3000:]
        assert "Traceback" not in err.split("kiln: error:")[-1]
        # (the small file system itself is this test's own mount)
        assert [line for line in leftovers(str(small_fs / "cache")) if line != f"mount {small_fs}"] == []
        assert list((small_fs / "cache" / "tmp").iterdir()) == []
        from kiln.store.entries import Store

        store = Store(small_fs / "cache")
        assert all(store.valid(e.key) for e in store.entries())  # what was finished is intact
    finally:
        subprocess.run(["umount", str(small_fs)], check=True)


def test_corrupted_cache_entry_is_detected_and_rebuilt(tmp_path: Path) -> None:
    extra = ["--env", "DIB_FAULT_NONCE=corrupt"]
    kiln("build", *SMALL, *extra, "--no-boot-test", "--output", str(tmp_path / "first"))
    from kiln.store.entries import Store

    store = Store(Path(kiln_env()["KILN_CACHE"]))
    steps = manifest(tmp_path / "first")["steps"]
    key = next(s["key"] for s in steps if s["name"] == "60-small-step")
    target = store.data(key) / "etc" / "kiln-small-step"
    target.write_text("tampered\n")
    proc = kiln("build", *SMALL, *extra, "--no-boot-test", "--output", str(tmp_path / "second"))
    assert "was changed after it was written" in proc.stdout + proc.stderr
    assert store.valid(key)
    assert (store.data(key) / "etc" / "kiln-small-step").read_text() != "tampered\n"


def test_secret_never_leaves_the_hook(tmp_path: Path) -> None:
    secret = "Kiln-S3cret-" + os.urandom(6).hex()
    env = {**kiln_env(), "KILN_ROOT_PASSWORD": secret, "DIB_DEBUG_TRACE": "1"}
    out = tmp_path / "out"
    proc = subprocess.run([*KILN, "build", "tests/data/secret.yaml", "--elements-path", "tests/data/elements",
                           "--secret", "KILN_ROOT_PASSWORD", "--no-boot-test", "--output", str(out)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert secret not in proc.stdout + proc.stderr
    m = manifest(out)
    assert secret not in json.dumps(m)
    assert m["spec"]["secrets"] == {"KILN_ROOT_PASSWORD": "**********"}
    raw = out / "secret.raw"
    assert subprocess.run(["grep", "-a", "-c", "-F", secret, str(raw)], capture_output=True).stdout.strip() == b"0"
    from tests.test_build_e2e import debugfs_cat, root_offset

    shadow = debugfs_cat(raw, root_offset(raw), "/etc/shadow") or ""
    root_hash = shadow.splitlines()[0].split(":")[1]
    assert root_hash.startswith("$") and len(root_hash) > 20  # the password is set, as a hash
    # the Prefect server: the flow run's parameters, logs and artifacts
    state = json.loads((Path(kiln_env()["KILN_STATE"]) / "prefect" / "server.json").read_text())
    api = state["url"]

    auth = (Path(kiln_env()["KILN_STATE"]) / api_http.AUTH_FILE).read_text()  # the server asks for it

    def post(path: str, body: dict[str, Any]) -> Any:
        status, answer = api_http.api_call(api, "POST", path, body, auth=auth)
        assert status == 200, (path, status, answer)
        return answer

    runs = post("/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1})
    assert runs and runs[0]["parameters"]["spec"]["name"] == "secret"
    assert secret not in json.dumps(runs[0]["parameters"])
    logs = post("/logs/filter", {"logs": {"flow_run_id": {"any_": [runs[0]["id"]]}}, "limit": 200})
    assert logs and secret not in json.dumps(logs)
    artifacts = post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [runs[0]["id"]]}}})
    assert artifacts and secret not in json.dumps(artifacts)
    results = Path(kiln_env()["KILN_STATE"]) / "prefect" / "results"
    grep = subprocess.run(["grep", "-r", "-l", "-a", "-F", secret, str(results)], capture_output=True, text=True)
    assert grep.stdout == ""


def _etc_snapshot() -> dict[str, tuple[int, int]]:
    snap = {}
    for p in [Path("/etc/hostname"), Path("/etc/resolv.conf"), Path("/etc/passwd"), Path("/etc/shadow"),
              *sorted(Path("/etc/apt").rglob("*")), *sorted(Path("/etc/ssh").glob("*"))]:
        if p.is_file():
            st = p.stat()
            snap[str(p)] = (st.st_mtime_ns, st.st_size)
    return snap


def test_hook_cannot_write_outside_its_target(tmp_path: Path) -> None:
    before = _etc_snapshot()
    proc = kiln("build", "tests/data/escape.yaml", "--elements-path", "tests/data/elements", "--no-boot-test",
                "--output", str(tmp_path), check=False)
    assert proc.returncode != 0
    assert "element 'escape-attempt': hook root.d/10-escape exited with 1" in proc.stderr
    assert "Read-only file system" in proc.stderr
    assert not Path("/etc/kiln-escape-attempt").exists()
    assert _etc_snapshot() == before
    assert leftovers() == []


def test_disk_too_small_for_the_tree_is_a_clear_error(tmp_path: Path) -> None:
    proc = kiln("build", *SMALL, "--size", "300M", "--no-boot-test", "--output", str(tmp_path), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.split("kiln: error:")[-1]
    assert "size" in err and "Traceback" not in err
    assert leftovers() == []


# Run inside a private mount namespace whose /dev is a copy (a tmpfs): should gc ever run through a build's
# /dev, it can only empty the copy. Prints one JSON line: /dev's entries before and after, and gc's output.
IN_NAMESPACE = r"""
import json, os, subprocess, sys, time
subprocess.run(["mount", "--make-rprivate", "/"], check=True)
copy = "/run/kiln-test-devcopy-%d" % os.getpid()
os.makedirs(copy)
subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "kiln-devcopy", copy], check=True)
subprocess.run(["cp", "-a", "/dev/.", copy + "/"], check=True)
subprocess.run(["mount", "--bind", copy, "/dev"], check=True)
before = sorted(os.listdir("/dev"))
kiln, args, marker = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
proc = subprocess.Popen(kiln + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        start_new_session=True)
seen, deadline = [], time.monotonic() + 900
for line in proc.stdout:
    seen.append(line)
    if marker in line:
        time.sleep(6)
        os.kill(proc.pid, 9)
        break
    if time.monotonic() > deadline:
        break
proc.wait(timeout=60)
gc = subprocess.run(kiln + ["gc"], capture_output=True, text=True, timeout=600)
after = sorted(os.listdir("/dev"))
cache = os.fsencode(os.environ["KILN_CACHE"])
with open("/proc/self/mountinfo", "rb") as fh:  # the kernel writes a space as \040, non-ASCII as bytes
    left = [line.split()[4].decode(errors="replace") for line in fh
            if line.split()[4].replace(b"\\040", b" ").startswith(cache)]
print(json.dumps({"killed": proc.returncode == -9, "before": before, "after": after, "gc": gc.stdout + gc.stderr,
                  "gc_rc": gc.returncode, "seen": "".join(seen[-30:]), "mounts_left": left}))
"""


@pytest.mark.timeout(1200)
def test_a_build_killed_under_a_non_ascii_cache_path_then_gc_leaves_dev_alone(tmp_path: Path) -> None:
    """Issue 15: a cache path with non-ASCII characters and a space, a build SIGKILLed during its package step
    (its chroot's /proc, /sys, /dev and devpts mounted), then `kiln gc`: gc must find the build's mounts by
    the names the kernel writes (octal escapes, bytes) and unmount them before it removes the tree, never
    running through /dev. In a private mount namespace over a copy of /dev, so a failure cannot hurt the
    machine; the host's own /dev is checked too."""
    cache = tmp_path / "kæsh ø"
    env = {**kiln_env(), "KILN_CACHE": str(cache)}
    host_dev = sorted(os.listdir("/dev"))
    args = ["build", *SMALL, "--no-boot-test", "--env", f"KILN_TEST_NONCE={os.urandom(4).hex()}", "--output",
            str(tmp_path / "killed")]
    proc = subprocess.run(["/usr/bin/unshare", "--mount", "--propagation", "private", "--", *KILN[:1], "-c",
                           IN_NAMESPACE, json.dumps(KILN), json.dumps(args), "running install.d/01-package-installs"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=1100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["killed"], result["seen"]
    assert result["gc_rc"] == 0 and "reclaimed" in result["gc"], result["gc"]
    assert result["after"] == result["before"], "gc removed /dev nodes (of the namespace's copy)"
    assert result["mounts_left"] == [], result["mounts_left"]  # gc unmounted the killed build's chroot
    assert sorted(os.listdir("/dev")) == host_dev
    assert leftovers(str(cache)) == []
    assert not (cache / "work").exists() or list((cache / "work").iterdir()) == []
