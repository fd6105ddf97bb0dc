#!/usr/bin/env python3
"""Matrix benchmark: two amd64 cells built in parallel versus one after the other, in one run.

Both runs are the same `kiln matrix` of two amd64 cells (Debian bookworm and trixie, the default image's
elements, --no-boot-test, --no-cache so that every step really runs; the store's package cache is warm
so neither run waits on downloads). Only the host's CPU slots differ: the serial run's host limit is
1 (`KILN_HOST_LIMITS=cpu=1` under its own host name, so the cells queue on the Prefect concurrency
limit), the parallel run's is 2. It prints both wall times, each cell's time and the ratio.
Target (issue 6): parallel <= 0.75 of serial on two cores.
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
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET = 0.75
MATRIX = """\
name: bench
base:
  elements: [vm, cloud-init, growroot, qemu-guest-agent, openssh-server]
  size: 4G
axes:
  release: [bookworm, trixie]
  arch: [amd64]
"""


def kiln(args: list[str], env: dict[str, str], log: Path) -> float:
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "kiln.cli", *args], env=env, cwd=REPO, stdout=out,
                              stderr=subprocess.STDOUT, text=True)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"kiln {' '.join(args)} failed ({proc.returncode}); last lines of {log}:\n"
                 + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=os.environ.get("KILN_BENCH_CACHE", "/var/tmp/kiln-bench/matrix-cache"),
                    help="the store (kept between runs: its package cache saves the downloads)")
    ap.add_argument("--keep", action="store_true", help="keep the output and logs")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-matrix-", dir="/var/tmp"))
    matrix = work / "bench.yaml"
    matrix.write_text(MATRIX)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    subprocess.run([sys.executable, "-m", "kiln.cli", "server", "start"], env=env, cwd=REPO, check=True,
                   capture_output=True)
    run_id = uuid.uuid4().hex[:6]  # fresh limits for each benchmark run
    common = ["matrix", str(matrix), "--no-boot-test", "--no-cache", "--cache", args.cache]
    walls: dict[str, float] = {}
    cells: dict[str, dict[str, float]] = {}
    try:
        # warm the package cache (not timed): the first build of each release downloads its .debs
        kiln([*common[:3], "--cache", args.cache, "--output", str(work / "warm")],
             {**env, "KILN_HOST": f"bench-warm-{run_id}", "KILN_HOST_LIMITS": "cpu=1"}, work / "warm.log")
        for name, slots in (("serial", 1), ("parallel", 2)):
            out = work / name
            walls[name] = kiln([*common, "--output", str(out)],
                               {**env, "KILN_HOST": f"bench-{name}-{run_id}", "KILN_HOST_LIMITS": f"cpu={slots}"},
                               work / f"{name}.log")
            summary = json.loads((out / "matrix.json").read_text())
            cells[name] = {c["name"]: c["seconds"] for c in summary["cells"]}
            print(f"{name:<9} {walls[name]:7.1f} s  (cpu slots {slots}; cells: "
                  + ", ".join(f"{n} {s:.0f} s" for n, s in cells[name].items()) + ")", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    ratio = walls["parallel"] / walls["serial"]
    print(f"\nparallel / serial = {walls['parallel']:.1f} / {walls['serial']:.1f} = {ratio:.2f} "
          f"(target <= {TARGET:.2f}) {'ok' if ratio <= TARGET else 'MISSED'}  [{os.cpu_count()} cores]")


if __name__ == "__main__":
    main()
