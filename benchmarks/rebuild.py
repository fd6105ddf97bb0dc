#!/usr/bin/env python3
"""Rebuild benchmark: how much of a build the layer cache saves.

In one invocation, on one fresh cache directory, it times:
  baseline  a bare mmdebstrap of the image's whole package set (what any uncached builder pays)
  cold      `kiln build` of the default image, nothing cached
  again     the same build again
  hook      after editing one install.d hook of a late element
  package   after adding one package (-p)
all with --no-boot-test, and prints each wall time, its ratio to the cold build and the stage times.
Targets (issue 3): again <= 0.10, hook <= 0.30, package <= 0.45 of cold; cold <= 0.6 of
diskimage-builder's ~180 s for a comparable image on these machines (a reference figure from
DESIGN.md; diskimage-builder does not run here without device-mapper).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DIB_REFERENCE_SECONDS = 180.0
TARGETS = {"again": 0.10, "hook": 0.30, "package": 0.45}


def kiln(args: list[str], env: dict[str, str]) -> float:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"kiln {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return seconds


def bare_bootstrap(elements: Path, env: dict[str, str], work: Path) -> float:
    plan = subprocess.run([sys.executable, "-m", "kiln.cli", "plan", "images/debian-12.yaml", "--json",
                           "--elements-path", str(elements)], env=env, cwd=REPO, capture_output=True, text=True,
                          check=True)
    data = json.loads(plan.stdout)
    packages = sorted({p for s in data["steps"] for p in s["packages"]})
    target = work / "bare-tree"
    start = time.monotonic()
    subprocess.run(["mmdebstrap", "--variant=minbase", "--include=" + ",".join(packages),
                    data["spec"]["release"], str(target), data["mirror"]], check=True, capture_output=True)
    seconds = time.monotonic() - start
    shutil.rmtree(target)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="keep the cache directory")
    ap.add_argument("--no-baseline", action="store_true", help="skip the bare mmdebstrap baseline")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-", dir="/var/tmp"))
    elements = work / "elements"
    shutil.copytree(REPO / "elements", elements, symlinks=True)
    env = dict(os.environ, KILN_CACHE=str(work / "cache"), PYTHONUNBUFFERED="1")
    subprocess.run([sys.executable, "-m", "kiln.cli", "server", "start"], env=env, cwd=REPO, check=True,
                   capture_output=True)
    common = ["build", "images/debian-12.yaml", "--no-boot-test", "--elements-path", str(elements)]
    results: dict[str, float] = {}
    manifests: dict[str, dict[str, object]] = {}

    def build(name: str, extra: tuple[str, ...] = ()) -> None:
        out = work / f"out-{name}"
        results[name] = kiln([*common, "--output", str(out), *extra], env)
        manifests[name] = json.loads((out / "manifest.json").read_text())
        print(f"{name:<9} {results[name]:7.1f} s", flush=True)

    try:
        if not args.no_baseline:
            results["baseline"] = bare_bootstrap(elements, env, work)
            print(f"{'baseline':<9} {results['baseline']:7.1f} s  (bare mmdebstrap of the same packages)", flush=True)
        build("cold")
        build("again")
        hook = elements / "growroot/install.d/70-growroot"
        hook.write_text(hook.read_text() + "# edited by benchmarks/rebuild.py\ntrue\n")
        build("hook")
        build("package", ("-p", "htop"))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    cold = results["cold"]
    print("\nrun        wall s   / cold   target")
    for name, seconds in results.items():
        target = TARGETS.get(name)
        verdict = "" if target is None else (" ok" if seconds / cold <= target else " MISSED")
        print(f"{name:<9} {seconds:7.1f}   {seconds / cold:5.2f}   {f'<= {target:.2f}' if target else '':<8}{verdict}")
    dib_ratio = cold / DIB_REFERENCE_SECONDS
    print(f"cold vs diskimage-builder's {DIB_REFERENCE_SECONDS:.0f} s (reference): {dib_ratio:.2f} "
          f"(target <= 0.60){' ok' if dib_ratio <= 0.6 else ' MISSED'}")
    if "baseline" in results:
        print(f"cold vs bare mmdebstrap in this run: {cold / results['baseline']:.2f}")
    print("\nstage seconds (cached stages marked *)")
    names = list(manifests)
    print(f"{'stage':<24}" + "".join(f"{n:>10}" for n in names))
    for stage in manifests["cold"]["timings"]:
        row = []
        for n in names:
            t = manifests[n]["timings"].get(stage)  # type: ignore[union-attr]
            row.append(f"{t['seconds']:9.1f}{'*' if t['cached'] else ' '}" if t else f"{'-':>10}")
        print(f"{stage:<24}" + "".join(row))


if __name__ == "__main__":
    main()
