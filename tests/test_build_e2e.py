"""End to end: the real `kiln build` on the embedded Prefect server, real mmdebstrap, real QEMU boots.

One image is built for the whole session (the seed document's example: the default image plus
cloud-init-cfg) and booted once per firmware; everything else reads its outputs or rebuilds from the
cache.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import REPO, kiln, kiln_env, leftovers, manifest

pytestmark = pytest.mark.slow


def debugfs_cat(raw: Path, offset: int, path: str) -> str | None:
    proc = subprocess.run(["debugfs", "-R", f"cat {path}", f"{raw}?offset={offset}"], capture_output=True,
                          text=True)
    if "File not found" in proc.stderr or proc.returncode != 0:
        return None
    return proc.stdout


def debugfs_ls(raw: Path, offset: int, path: str) -> list[str]:
    proc = subprocess.run(["debugfs", "-R", f"ls -l {path}", f"{raw}?offset={offset}"], capture_output=True,
                          text=True, check=True)
    return [line.split()[-1] for line in proc.stdout.splitlines() if line.strip()]


def root_offset(raw: Path) -> int:
    out = subprocess.run(["sgdisk", "-i", "1", str(raw)], capture_output=True, text=True, check=True).stdout
    first = next(line for line in out.splitlines() if line.startswith("First sector"))
    return int(first.split(":")[1].split()[0]) * 512


def test_image_boots_under_bios_and_uefi_with_root_grown(seed_build: tuple[Path, dict[str, Any], float]) -> None:
    out, m, _ = seed_build
    boots = {b["firmware"]: b for b in m["boot_test"]}
    assert set(boots) == {"bios", "uefi"}
    for b in boots.values():
        assert b["passed"], b
        # the serial console log is kept beside the image, not only in the store (kiln cache gc deletes it)
        console = Path(b["serial_log"])
        assert console.parent == out and "Linux version" in console.read_text(errors="replace"), console
        assert b["cached"] is False, b  # booted in this session (its boot generation), not an old result
        # no unit failed at first boot (cloud-init's locale module did, and cloud-config.service with it,
        # until the base generated the locale it sets)
        assert b["failed_units"] == [], b
        # the boot disk is 1 GiB larger than the 4 GiB image: a root fs above 4 GiB was grown
        assert b["root_bytes"] > 4.2 * 1024**3, b
        assert b["disk_bytes"] - b["root_bytes"] < 0.5 * 1024**3, b


def test_boot_test_of_a_finished_build_for_scripts(seed_build: tuple[Path, dict[str, Any], float]) -> None:
    """`kiln boot-test OUTPUT --json`: the results alone on stdout (issue 19), booted now (not from a cache)."""
    out, _, _ = seed_build
    proc = kiln("boot-test", str(out), "--firmware", "uefi", "--json")
    [result] = json.loads(proc.stdout)
    assert result["firmware"] == "uefi" and result["passed"] and result["cached"] is False


def test_seed_example_root_password_login(seed_build: tuple[Path, dict[str, Any], float]) -> None:
    """The seed document's point: root logs in with the password injected through user-data, on the console
    and over SSH (a real ssh client, password authentication, through a port forwarded from 127.0.0.1)."""
    _, m, _ = seed_build
    for b in m["boot_test"]:
        assert b["login_ok"] is True and b["cached"] is False, b
        assert b["ssh_ok"] is True, b


def _suite_versions(mirror: str, suite: str) -> dict[str, list[str]]:
    """Every version of every package the suite's main/binary-amd64 index offers (read as apt reads it)."""
    import lzma

    from kiln.sources.mirror import fetch_url

    versions: dict[str, list[str]] = {}
    name = ""
    text = lzma.decompress(fetch_url(f"{mirror}/dists/{suite}/main/binary-amd64/Packages.xz")).decode()
    for line in text.splitlines():
        if line.startswith("Package:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("Version:"):
            versions.setdefault(name, []).append(line.split(":", 1)[1].strip())
    return versions


def test_every_package_is_at_the_newest_version_the_mirrors_suites_offer(
        seed_build: tuple[Path, dict[str, Any], float]) -> None:
    """The image is built from bookworm, -updates and -security: no suite of the host's mirror offers a newer
    version of any installed package, and the security uploads (there are always some) are in."""
    _, m, _ = seed_build
    suites = m["base"]["suites"]
    assert [s["name"] for s in suites] == ["bookworm", "bookworm-updates", "bookworm-security"]
    offered: dict[str, list[str]] = {}
    for s in suites:
        for name, versions in _suite_versions(s["mirror"], s["name"]).items():
            offered.setdefault(name, []).extend(versions)
    stale = []
    for p in m["packages"]:
        newer = [v for v in offered.get(p["name"], []) if subprocess.run(
            ["dpkg", "--compare-versions", v, "gt", p["version"]]).returncode == 0]
        if newer:
            stale.append(f"{p['name']} {p['version']} (offered: {', '.join(newer)})")
    assert stale == [], stale
    assert m["security_updates"] > 0 and m["package_origins"]["bookworm-security"] == m["security_updates"]
    assert {p["suite"] for p in m["packages"]} <= {s["name"] for s in suites}


def test_outputs_manifest_and_checksums(seed_build: tuple[Path, dict[str, Any], float]) -> None:
    out, m, _ = seed_build
    sums = dict(line.split()[::-1] for line in (out / "SHA256SUMS").read_text().splitlines())
    # the images, the manifest and both SBOMs, signed (kiln verify checks the signature: test_sbom_e2e.py)
    assert set(sums) == {"debian-12-seed-example.qcow2", "debian-12-seed-example.raw", "manifest.json",
                         "debian-12-seed-example.spdx.json", "debian-12-seed-example.cdx.json"}
    assert (out / "SHA256SUMS.gpg").is_file() and (out / "SHA256SUMS.key").is_file()
    for name, digest in sums.items():
        h = hashlib.sha256()
        with open(out / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        assert h.hexdigest() == digest, name
    info = subprocess.run(["qemu-img", "info", str(out / "debian-12-seed-example.qcow2")], capture_output=True,
                          text=True, check=True).stdout
    assert "file format: qcow2" in info
    packages = {p["name"]: p["version"] for p in m["packages"]}
    for needed in ("cloud-init", "linux-image-cloud-amd64", "grub-efi-amd64-bin", "qemu-guest-agent", "openssh-server"):
        assert packages.get(needed), needed
    assert {e["name"] for e in m["elements"]} >= {"debian-minimal", "vm", "cloud-init", "cloud-init-cfg", "cleanup"}
    assert {e["name"]: e["origin"] for e in m["elements"]}["cloud-init-cfg"] == "kiln"  # the one kiln ships
    assert all(len(e["sha256"]) == 64 for e in m["elements"])
    assert m["spec"]["name"] == "debian-12-seed-example"
    assert {"fetch_base", "pack", "customize install.d"} <= set(m["timings"])


def test_image_content_is_clean(seed_build: tuple[Path, dict[str, Any], float]) -> None:
    out, _, _ = seed_build
    raw = out / "debian-12-seed-example.raw"
    off = root_offset(raw)
    assert debugfs_cat(raw, off, "/etc/machine-id") == ""
    assert debugfs_cat(raw, off, "/etc/hostname") == "localhost\n"
    assert debugfs_cat(raw, off, "/etc/resolv.conf") is None
    assert not [n for n in debugfs_ls(raw, off, "/etc/ssh") if n.startswith("ssh_host_")]
    assert [n for n in debugfs_ls(raw, off, "/var/lib/apt/lists") if n not in (".", "..")] in ([], ["partial"],
                                                                                               ["auxfiles"])
    fstab = debugfs_cat(raw, off, "/etc/fstab") or ""
    assert any(line.split()[:2][1:] == ["/"] and line.startswith("UUID=") for line in fstab.splitlines())
    cfg = debugfs_cat(raw, off, "/etc/cloud/cloud.cfg.d/92-dib-cloud-neunn.cfg") or ""
    assert "disable_root: false" in cfg and "expire: False" in cfg
    assert "ConfigDrive, OpenStack, NoCloud" in (debugfs_cat(raw, off, "/etc/cloud/cloud.cfg.d/91-kiln-datasources.cfg")
                                                 or "")


def test_second_build_comes_from_the_cache(seed_build: tuple[Path, dict[str, Any], float],
                                          tmp_path: Path) -> None:
    _, first, _ = seed_build
    proc = kiln("-v", "build", "tests/data/seed-example.yaml", "--output", str(tmp_path))
    m = manifest(tmp_path)
    stages = m["timings"]
    assert all(v["cached"] for k, v in stages.items() if k not in ("plan", "convert")), stages
    assert all(b["cached"] for b in m["boot_test"])
    assert [i["sha256"] for i in m["images"]] == [i["sha256"] for i in first["images"]]
    out = proc.stdout + proc.stderr
    # every stage says in one line, by its name, whether it ran or came from the cache; Prefect's anonymous
    # "Finished in state Cached(type=COMPLETED)" lines are gone, and the build ends with its stage table
    for stage, timing in stages.items():
        said = rf"kiln\.build\W+{re.escape(stage)}: {'cached' if timing['cached'] else 'done'} in "
        assert re.search(said, out), (stage, out[-3000:])
        assert any(line.split()[:1] == [stage.split()[0]] and line.rstrip().endswith("yes" if timing["cached"]
                   else "no") for line in out.splitlines()), stage
    assert "Finished in state Cached" not in out
    # -v: kiln's own debug lines (issue 14: the flow used to force INFO), not those of the HTTP libraries
    assert " DEBUG kiln." in out and " DEBUG httpcore" not in out
    # for scripts: --json prints the build record alone on stdout; -q leaves the stage lines (issue 19)
    quiet = kiln("build", "tests/data/seed-example.yaml", "--output", str(tmp_path / "json"), "--json", "-q")
    record = json.loads(quiet.stdout)
    assert record["build_id"] != m["build_id"] and record["images"][0]["sha256"] == m["images"][0]["sha256"]
    assert record["run_url"] and "/flow-run/" in record["run_url"]  # the run's page, as Prefect names it
    assert re.search(r"kiln\.build\W+pack: cached in ", quiet.stderr), quiet.stderr[-2000:]
    assert "Beginning flow run" not in quiet.stderr and " DEBUG " not in quiet.stderr


def test_failing_hook_names_element_hook_code_and_output(tmp_path: Path) -> None:
    proc = kiln("build", "tests/data/failing.yaml", "--elements-path", "tests/data/elements", "--no-boot-test",
                "--output", str(tmp_path), check=False)
    assert proc.returncode != 0
    err = proc.stderr
    assert "element 'failing-hook'" in err
    assert "install.d/50-fail" in err
    assert "exited with 3" in err
    assert "KILN-FAIL-TAIL: the last words of a failing hook" in err
    assert "Traceback" not in err.split("kiln: error:")[-1]
    assert not (tmp_path / "manifest.json").exists()
    assert leftovers() == []


def test_nothing_left_behind(seed_build: tuple[Path, dict[str, Any], float]) -> None:
    assert leftovers() == []
    work = Path(kiln_env()["KILN_CACHE"]) / "work"
    assert not work.exists() or list(work.iterdir()) == []
    assert list((Path(kiln_env()["KILN_CACHE"]) / "tmp").iterdir()) == []


def test_readme_default_spec_plans() -> None:
    proc = kiln("plan", str(REPO / "images/debian-12.yaml"))
    assert "install.d" in proc.stdout and "01-package-installs" in proc.stdout
