"""`kiln matrix` end to end on the embedded Prefect: a failed cell does not stop the others."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e import REPO, kiln_env

pytestmark = pytest.mark.slow


def test_a_failed_cell_does_not_stop_the_others(tmp_path: Path) -> None:
    matrix = tmp_path / "m.yaml"
    matrix.write_text("name: e2e\nbase: {elements: [vm, small-step], size: 2G}\n"
                      "axes:\n  release:\n    bookworm:\n    trixie: {add_elements: [no-such-element]}\n"
                      "  arch: [amd64]\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "matrix", str(matrix), "--no-boot-test",
                           "--elements-path", "tests/data/elements", "--output", str(out)],
                          env=kiln_env(), cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 1, proc.stderr[-4000:]
    summary = json.loads((out / "matrix.json").read_text())
    cells = {c["name"]: c for c in summary["cells"]}
    assert cells["debian-bookworm-amd64"]["status"] == "built"
    assert (out / "debian-bookworm-amd64" / "debian-bookworm-amd64.qcow2").is_file()
    assert cells["debian-trixie-amd64"]["status"] == "failed"
    assert "no-such-element" in cells["debian-trixie-amd64"]["error"]
    assert "debian-trixie-amd64          FAILED" in proc.stdout
    assert "1 of 2 cells did not build: debian-trixie-amd64 (failed)" in proc.stdout + proc.stderr
    # for scripts: the summary alone on stdout (the good cell comes from the cache now)
    again = subprocess.run([sys.executable, "-m", "kiln.cli", "matrix", str(matrix), "--no-boot-test",
                            "--elements-path", "tests/data/elements", "--output", str(tmp_path / "again"), "--json"],
                           env=kiln_env(), cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert again.returncode == 1, again.stderr[-4000:]
    as_json = json.loads(again.stdout)
    assert {c["name"]: c["status"] for c in as_json["cells"]} == {"debian-bookworm-amd64": "built",
                                                                  "debian-trixie-amd64": "failed"}


def test_only_and_list_need_no_server() -> None:
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "matrix", "images/nightly.yaml", "--only",
                           "arch=amd64,release=trixie", "--list"], env=kiln_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "debian-trixie-amd64: release=trixie, arch=amd64"
    bad = subprocess.run([sys.executable, "-m", "kiln.cli", "matrix", "images/nightly.yaml", "--only",
                          "arch=sparc"], env=kiln_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a value of axis 'arch'" in bad.stderr
