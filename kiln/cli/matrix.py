"""`kiln matrix`, `kiln refresh` and `kiln serve`: `register(subparsers)` adds them to kiln's command line
(kiln/cli/main.py)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from kiln.cli.common import add_cache, port_arg
from kiln.host.state import state_dir
from kiln.model.errors import KilnError
from kiln.model.matrix import CellResult, load_cells, publish_text, select
from kiln.model.options import BuildOptions
from kiln.model.pkgdiff import diff_from_dict
from kiln.server import api_http, serve
from kiln.server import prefect as prefect_server
from kiln.store.entries import Store
from kiln.store.gc import reclaim_dead_builds

log = logging.getLogger("kiln.matrix_cli")


def register(subparsers: Any) -> None:
    """Add `matrix` and `serve` to `subparsers` (the result of `ArgumentParser.add_subparsers`)."""
    m = subparsers.add_parser("matrix", help="build every cell of a matrix file (distro x release x arch)",
                              description="Build every cell of a matrix file on the embedded Prefect server, "
                              "in parallel within this host's CPU, disk and KVM slots; each cell's images, "
                              "manifest.json and SHA256SUMS under OUTPUT/<cell name>/, a summary in "
                              "OUTPUT/matrix.json and as a Prefect artifact.")
    m.add_argument("matrix", type=Path, help="matrix file, e.g. images/nightly.yaml")
    m.add_argument("--only", action="append", default=[], metavar="AXIS=VALUE[,AXIS=VALUE]",
                   help="build only the cells matching every axis given (repeatable; values of one axis are "
                   "alternatives), e.g. --only arch=amd64,release=trixie")
    m.add_argument("-o", "--output", default="output", help="output directory (default: ./output)")
    m.add_argument("--no-boot-test", action="store_true", help="skip the QEMU boot tests")
    add_cache(m)
    m.add_argument("--no-cache", action="store_true", help="rebuild every step")
    m.add_argument("--elements-path", action="append", default=[], metavar="DIR",
                   help="element directory searched before kiln's own (repeatable; also ELEMENTS_PATH)")
    m.add_argument("--dib-elements", action="store_true", help="search the installed diskimage-builder's elements")
    m.add_argument("--list", action="store_true", help="print the selected cells and their specs; build nothing")
    m.add_argument("--deployment", metavar="FLOW/DEPLOYMENT",
                   help="run each cell as a run of this deployment (e.g. build-on-host/build-image) on the work "
                   "pool's workers instead of in this process")
    m.add_argument("--json", action="store_true", help="print the summary (matrix.json) on stdout")
    m.set_defaults(func=cmd_matrix)

    r = subparsers.add_parser("refresh", help="the nightly refresh in this process: build every cell, publish "
                              "what changed", description="Build every cell of a matrix file as `kiln matrix` "
                              "does, and publish each cell that built and booted to the matrix's publish: targets "
                              "(or --to): only where the stable image lacks its content (packages, elements, spec), "
                              "with a package diff against the stable it replaces; a cell with nothing new is "
                              "reported unchanged. The same flow as the nightly-refresh deployment.")
    r.add_argument("matrix", type=Path, help="matrix file, e.g. images/nightly.yaml")
    r.add_argument("--only", action="append", default=[], metavar="AXIS=VALUE[,AXIS=VALUE]",
                   help="refresh only the cells matching every axis given (repeatable)")
    r.add_argument("--to", action="append", dest="targets", metavar="TARGET",
                   help="glance:CLOUD or s3://BUCKET/PREFIX (repeatable; replaces the matrix's publish targets)")
    r.add_argument("-o", "--output", default="output/nightly", help="output directory (default: ./output/nightly)")
    r.add_argument("--no-boot-test", action="store_true", help="skip the QEMU boot tests (the manifest gate then "
                   "refuses to publish)")
    add_cache(r)
    r.add_argument("--json", action="store_true", help="print every cell's result as JSON on stdout")
    r.set_defaults(func=cmd_refresh)

    s = subparsers.add_parser("serve", help="the Prefect server, kiln's deployments and a worker, with the UI",
                              description="Start (or reuse) the local Prefect server, create the process work "
                              "pool 'kiln', register deployments/prefect.yaml and run a worker on this host "
                              "until Ctrl-C. Prints how to open the UI.")
    s.add_argument("--port", type=port_arg, help="port of the local Prefect server if one is started (default 4200)")
    s.add_argument("--pool", default="kiln", help="work pool (default: kiln)")
    s.add_argument("--name", help="worker name (default: kiln-<host>)")
    s.add_argument("--limit", type=int, help="at most this many runs at once on this worker")
    s.add_argument("--no-deploy", action="store_true", help="do not (re-)register the deployments")
    s.set_defaults(func=cmd_serve)


def _start_prefect(port: int | None = None) -> tuple[str, Path]:

    state = state_dir()
    url = prefect_server.ensure_server(state, port=port)
    prefect_server.configure_environment(url, state)
    return url, state


def cmd_matrix(args: argparse.Namespace) -> int:

    spec_file, cells = load_cells(args.matrix)
    cells = select(cells, args.only, str(args.matrix))
    if args.list:
        for cell in cells:
            print(f"{cell.name}: {cell.label()}")
            print("  " + json.dumps(cell.spec.model_dump(mode="json", exclude={"secrets"})))
        return 0
    options = BuildOptions(elements_path=args.elements_path, cache=args.cache, no_cache=args.no_cache,
                           boot_test=not args.no_boot_test, dib_elements=args.dib_elements)
    for line in reclaim_dead_builds(Store(Path(args.cache) if args.cache else None)):
        log.warning("%s", line)
    _start_prefect()
    from flows.matrix import SUMMARY_FILE, build_matrix

    print(f"kiln: matrix {spec_file.name}: {len(cells)} cells: {', '.join(c.name for c in cells)}", flush=True,
          file=sys.stderr if args.json else sys.stdout)
    start = time.monotonic()
    state = build_matrix(str(args.matrix), only=args.only, output=args.output, boot_test=not args.no_boot_test,
                         deployment=args.deployment, options=options, return_state=True)
    summary_path = Path(args.output) / SUMMARY_FILE
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        raise KilnError(f"matrix {spec_file.name} ended {state.name} without a summary: {state.message}") from None
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0 if state.is_completed() else 1
    print(f"\nkiln: matrix {spec_file.name} in {time.monotonic() - start:.0f} s")
    for cell in summary["cells"]:
        verdict = "built" if cell["status"] == "built" else cell["status"].upper()
        print(f"  {cell['name']:<28} {verdict:<10} {cell['seconds']:6.0f} s  {cell['output']}")
        for b in cell["boot_test"]:
            print(f"      boot test {b['firmware']}: {'passed' if b['passed'] else 'FAILED'} ({b['seconds']:.0f} s)")
        if cell["error"]:
            print("      " + cell["error"].strip().splitlines()[0])
    print(f"  summary:  {summary_path}")
    return 0 if state.is_completed() else 1


def cmd_refresh(args: argparse.Namespace) -> int:

    spec_file, cells = load_cells(args.matrix)
    cells = select(cells, args.only, str(args.matrix))
    if args.cache:
        os.environ["KILN_CACHE"] = args.cache
    for line in reclaim_dead_builds(Store(Path(args.cache) if args.cache else None)):
        log.warning("%s", line)
    _start_prefect()
    from flows.matrix import SUMMARY_FILE
    from flows.refresh import nightly_refresh

    print(f"kiln: refresh {spec_file.name}: {len(cells)} cells: {', '.join(c.name for c in cells)}", file=sys.stderr,
          flush=True)
    start = time.monotonic()
    state = nightly_refresh(str(args.matrix), only=args.only, output=args.output, boot_test=not args.no_boot_test,
                            deployment=None, publish_targets=args.targets, return_state=True)
    summary_path = Path(args.output) / SUMMARY_FILE
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        raise KilnError(f"refresh {spec_file.name} ended {state.name} without a summary: {state.message}") from None
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0 if state.is_completed() else 1

    print(f"\nkiln: refresh {spec_file.name} in {time.monotonic() - start:.0f} s")
    for cell in summary["cells"]:
        r = CellResult.model_validate(cell)
        print(f"  {r.name:<28} {r.status if r.ok else r.status.upper():<10} "
              f"{publish_text(r) if r.ok else (r.error or '').strip().splitlines()[0:1]}")
        if r.ok and (r.published or {}).get("diff"):
            for line in diff_from_dict((r.published or {})["diff"]).lines():
                print("    " + line.strip())
    print(f"  summary:  {summary_path}")
    return 0 if state.is_completed() else 1


def cmd_serve(args: argparse.Namespace) -> int:

    url, state = _start_prefect(args.port)
    env = dict(os.environ)
    env.update(prefect_server.client_environment(url, state))
    serve.ensure_work_pool(url, args.pool)
    serve.ensure_zombie_automation(url)
    if not args.no_deploy:
        print("kiln serve: registering deployments/prefect.yaml …", flush=True)
        serve.register_deployments(env)
    registered = serve.deployments(url)
    for name in serve.DEPLOYMENTS:
        if name not in registered:
            raise KilnError(f"deployment {name} is not registered on {url} (run without --no-deploy)")
    worker = serve.start_worker(env, pool=args.pool, name=args.name, limit=args.limit,
                                log_dir=prefect_server.prefect_home(state) / "workers")
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        serve.wait_worker_ready(worker, url, args.pool)
        ui = url.removesuffix("/api")
        managed = url == prefect_server.recorded_url(state)
        print(serve.how_to_use(ui, url, state / api_http.AUTH_FILE if managed else None), flush=True)
        print(f"worker {worker.name} is online (log {worker.log})", flush=True)
        while not stopping and worker.proc.poll() is None:
            time.sleep(0.5)
    finally:
        print(f"kiln serve: stopping worker {worker.name}", flush=True)
        serve.stop_worker(worker)
    if worker.proc.returncode not in (0, -signal.SIGTERM, None) and not stopping:
        print(f"kiln serve: the worker exited with {worker.proc.returncode}; see {worker.log}", file=sys.stderr)
        return 1
    return 0
