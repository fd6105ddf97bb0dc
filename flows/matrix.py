"""build_matrix: every cell of a matrix file its own build_image flow run, in parallel.

    load and select cells -> one task per cell, all submitted at once:
        in-process (`kiln matrix`):  build_image as a subflow, holding this host's slots
        on a work pool:              run_deployment("build-on-host/build-image"): a worker's host runs it,
                                     holding that host's slots
    -> every cell's result (a failed cell never stops the others) -> summary table artifact, matrix.json

How many builds a host runs at once is decided by Prefect global concurrency limits named for the host
(`kiln-<host>-cpu`, `-disk`, `-kvm`; see `kiln.model.matrix.default_limits` and `cell_demand`). kiln creates
them when missing and acquires them with `strict=True`, so a limit deleted under a running fleet is an
error, never silently unlimited. Operators resize them with `prefect gcl update NAME --limit N`.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType, FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun, State
from prefect.concurrency.sync import concurrency
from prefect.context import FlowRunContext
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.futures import PrefectFuture
from prefect.settings import PREFECT_UI_URL
from prefect.task_runners import ThreadPoolTaskRunner

from flows.build import build_image
from flows.guard import guard_remote_run
from kiln.model.errors import KilnError
from kiln.model.matrix import (
    SLOT_KINDS,
    Cell,
    CellResult,
    CellStatus,
    MatrixError,
    cell_demand,
    default_limits,
    host_name,
    limit_name,
    load_cells,
    select,
    summary_table,
)
from kiln.model.options import BuildOptions
from kiln.model.publishing import PublishSpec
from kiln.model.record import MANIFEST, BuildRecord, new_build_id
from kiln.model.spec import ImageSpec
from kiln.store.entries import Store

BUILD_DEPLOYMENT = "build-on-host/build-image"
MAX_PARALLEL = 16  # cells submitted at once; the host slots decide how many really build
HOST_LOST_RETRIES = 2  # times a cell whose run crashed (its host died, its process was killed) is built again
RESULT_ARTIFACT = "kiln-cell-result"  # description of the table artifact a build-on-host run leaves
SUMMARY_FILE = "matrix.json"


class MatrixFailed(KilnError):
    """Some cells of a matrix did not build; the others did and their results are kept."""


# ----------------------------------------------------------------------------------------- host slots


def ensure_host_limits(cache: str | None = None) -> dict[str, int]:
    """This host's global concurrency limits, created with `default_limits` when missing; their sizes."""
    sizes: dict[str, int] = {}
    wanted = default_limits(Store(Path(cache) if cache else None).root)
    with get_client(sync_client=True) as client:
        for kind in SLOT_KINDS:
            name = limit_name(kind)
            try:
                sizes[kind] = client.read_global_concurrency_limit_by_name(name).limit
                continue
            except ObjectNotFound:
                pass
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=wanted[kind]))
                get_run_logger().info("created the concurrency limit %s with %d slots", name, wanted[kind])
            except ObjectAlreadyExists:  # another build on this host was quicker
                pass
            sizes[kind] = client.read_global_concurrency_limit_by_name(name).limit
    return sizes


@contextmanager
def host_slots(spec: ImageSpec, options: BuildOptions) -> Iterator[dict[str, int]]:
    """Hold the slots a build of `spec` needs on this host (waiting for them), for the `with` block."""
    logger = get_run_logger()
    demand = cell_demand(spec, boot_test=options.boot_test)
    sizes = ensure_host_limits(options.cache)
    for kind, need in demand.items():
        if need > sizes[kind]:
            raise KilnError(f"{spec.name} needs {need} {kind} slots but {limit_name(kind)} has only {sizes[kind]}: "
                            f"raise it (prefect gcl update {limit_name(kind)} --limit {need}) or build it elsewhere")
    start = time.monotonic()
    with ExitStack() as stack:
        # always in SLOT_KINDS order, so two builds never each hold what the other waits for
        for kind in SLOT_KINDS:
            if kind in demand:
                stack.enter_context(concurrency(limit_name(kind), occupy=demand[kind], strict=True))
        waited = time.monotonic() - start
        logger.info("holding %s on %s%s", ", ".join(f"{n} {k}" for k, n in demand.items()), host_name(),
                    f" (waited {waited:.0f} s)" if waited >= 1 else "")
        yield demand


# ----------------------------------------------------------------------------------------- one cell


@flow(name="build-on-host", log_prints=True)
def build_on_host(spec: ImageSpec, options: BuildOptions | None = None) -> dict[str, Any]:
    """`build_image` on the host this run landed on, within that host's CPU, disk and KVM slots.

    The `build-image` deployment runs this flow: a worker on any build host picks it up, so a matrix's
    cells spread over the fleet, and a build started from the UI form respects the host's limits too.
    """
    options = options or BuildOptions()
    guard_remote_run(spec, options)  # a run from the UI or the API: only the paths this host allows
    kiln_logger = logging.getLogger("kiln")
    if kiln_logger.level == logging.NOTSET:  # a worker's run process: let kiln's INFO lines reach the run logs
        kiln_logger.setLevel(logging.INFO)
    with host_slots(spec, options):
        record = build_image(spec, options, new_build_id())
    report = cell_report(record)
    row = {"images": json.dumps(report["images"]), "manifest": report["manifest"], "output": report["output"],
           "boot_test": json.dumps(report["boot_test"]), "host": socket.gethostname(),
           "published": json.dumps(report.get("published"))}
    create_table_artifact(table=[row], description=RESULT_ARTIFACT)
    return report


def _status(state: State[Any]) -> CellStatus:
    if state.is_completed():
        return "built"
    if state.is_cancelled() or state.is_cancelling():
        return "cancelled"
    if state.is_crashed():
        return "crashed"
    return "failed"


def _error(state: State[Any]) -> str | None:
    if state.is_completed():
        return None
    try:
        state.result(raise_on_failure=True)
    except BaseException as exc:  # the exception the run ended with, as the operator should read it
        return str(exc).strip() or type(exc).__name__
    return state.message or state.name


def _remote_details(flow_run_id: str) -> dict[str, Any]:
    """What a `build-on-host` run on another host left for us: its result row and the worker that ran it."""
    details: dict[str, Any] = {}
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)  # type: ignore[arg-type]
        labels = run.labels or {}
        details["worker"] = labels.get("prefect.worker.name")
        details["host"] = (run.infrastructure_pid or "").rpartition(":")[0] or None
        details["name"] = run.name
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["table"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
        )
    for artifact in artifacts:
        if artifact.description == RESULT_ARTIFACT and artifact.data:
            data = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
            if isinstance(data, list) and data:
                details["row"] = data[0]
    return details


def _run_on_a_host(cell: Cell, options: BuildOptions, deployment: str, matrix_name: str) -> FlowRun:
    """A run of `deployment` for the cell, on whichever worker takes it. A run that crashed (the server marks
    a run Crashed when its heartbeats stop: its host died, or its process was killed) is started again, and
    another worker takes it; a run that failed or was cancelled is the cell's result."""
    logger = get_run_logger()
    for attempt in range(1 + HOST_LOST_RETRIES):
        name = f"{matrix_name}-{cell.name}" + (f"-retry{attempt}" if attempt else "")
        run: FlowRun = run_deployment(  # type: ignore[assignment]
            deployment, parameters={"spec": cell.spec, "options": options}, flow_run_name=name,
            tags=["kiln-matrix", matrix_name], timeout=None, poll_interval=3, as_subflow=True)
        if run.state is None or not run.state.is_crashed() or attempt == HOST_LOST_RETRIES:
            return run
        worker = (run.labels or {}).get("prefect.worker.name") if hasattr(run, "labels") else None
        logger.warning("cell %s: run %s crashed%s (%s); building it again on whichever worker is free", cell.name,
                       name, f" on {worker}" if worker else "", run.state.message or "no message")
    return run


def cell_report(record: BuildRecord) -> dict[str, Any]:
    """What a cell's build tells the matrix (which may run in another process, on another host): plain data."""
    return {"images": [str(record.image_path(i)) for i in record.images], "manifest": str(record.path_of(MANIFEST)),
            "output": str(record.output), "boot_test": [b.as_dict() for b in record.boot_test],
            "published": record.published[-1] if record.published else None}


@task(name="cell", task_run_name="cell {cell.name}")
def build_cell(cell: Cell, options: BuildOptions, deployment: str | None, matrix_name: str) -> CellResult:
    """Build one cell (here, or through `deployment` on whichever worker is free) and say how it went.

    Never raises for a failed build: the cell's result says so, and the other cells go on."""
    logger = get_run_logger()
    start = time.monotonic()
    result = CellResult(name=cell.name, axes=cell.axes, status="failed", output=options.output)
    if deployment is None:
        with host_slots(cell.spec, options):
            state: State[Any] = build_image(cell.spec, options, new_build_id(), return_state=True)  # type: ignore[assignment]
        result.status = _status(state)
        result.error = _error(state)
        result.flow_run_id = str(state.state_details.flow_run_id) if state.state_details.flow_run_id else None
        result.worker = socket.gethostname()
        if state.is_completed():
            report = cell_report(state.result())  # type: ignore[arg-type]
            result.images = list(report["images"])
            result.manifest = report["manifest"]
            result.boot_test = list(report["boot_test"])
            result.published = report.get("published")
    else:
        if cell.spec.secrets:
            raise MatrixError(f"cell {cell.name}: its spec has secrets, which a deployment's parameters would carry "
                              "masked; give the build hosts the values (DIB_* variables in the worker's environment)")
        run = _run_on_a_host(cell, options, deployment, matrix_name)
        assert run.state is not None
        result.status = _status(run.state)
        result.error = None if run.state.is_completed() else (run.state.message or run.state.name)
        result.flow_run_id = str(run.id)
        details = _remote_details(str(run.id))
        result.flow_run_name = details.get("name")
        result.worker = " ".join(x for x in (details.get("worker"), details.get("host") and f"({details['host']})")
                                 if x) or None
        row = details.get("row")
        if row:
            result.images = json.loads(row["images"])
            result.manifest = row["manifest"]
            result.boot_test = json.loads(row["boot_test"])
            result.published = json.loads(row.get("published") or "null")
    result.seconds = round(time.monotonic() - start, 1)
    if result.ok:
        logger.info("cell %s: built in %.0f s", cell.name, result.seconds)
    else:
        logger.error("cell %s: %s: %s", cell.name, result.status, (result.error or "").splitlines()[0:1])
    return result


# ----------------------------------------------------------------------------------------- the matrix


def run_matrix(matrix: str, *, only: Sequence[str] = (), output: str = "output", options: BuildOptions | None = None,
               deployment: str | None = None, publish_targets: Sequence[str] | None = None,
               ) -> tuple[str, list[CellResult]]:
    """The body both `build_matrix` and `nightly_refresh` run: every selected cell at once, their results
    (in matrix order), the summary artifact and `<output>/matrix.json`. Returns (matrix name, results).
    `publish_targets` replaces the targets of every cell's `publish:` section."""
    logger = get_run_logger()
    options = options or BuildOptions()
    path = Path(matrix)
    spec_file, cells = load_cells(path)
    cells = select(cells, only, str(path))
    if publish_targets is not None:
        cells = [with_targets(c, publish_targets) for c in cells]
    logger.info("matrix %s: %d cells: %s%s", spec_file.name, len(cells), ", ".join(c.name for c in cells),
                f" (on deployment {deployment})" if deployment else " (in this process)")
    futures: list[PrefectFuture[CellResult]] = []
    for cell in cells:
        cell_options = options.model_copy(update={"output": str(Path(output) / cell.name)})
        futures.append(build_cell.submit(cell, cell_options, deployment, spec_file.name))
    results: list[CellResult] = []
    for cell, future in zip(cells, futures, strict=True):
        future.wait()
        if future.state.is_completed():
            results.append(future.result())
        else:  # the task itself broke (a limit that cannot be had, a secret for a deployment…)
            results.append(CellResult(name=cell.name, axes=cell.axes, status=_status(future.state),
                                      error=_error(future.state), output=str(Path(output) / cell.name)))
    ui = PREFECT_UI_URL.value()
    markdown = summary_table(spec_file.name, results, ui_url=ui)
    create_markdown_artifact(key=f"matrix-{spec_file.name}", markdown=markdown,
                             description=f"kiln matrix {spec_file.name}: every cell's result")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    ctx = FlowRunContext.get()
    summary = {"matrix": spec_file.name, "file": str(path),
               "flow_run_id": str(ctx.flow_run.id) if ctx and ctx.flow_run else None,
               "cells": [r.model_dump(mode="json") for r in results]}
    tmp = out / f".{SUMMARY_FILE}.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out / SUMMARY_FILE)
    return spec_file.name, results


def with_targets(cell: Cell, targets: Sequence[str]) -> Cell:
    """`cell` with its spec's publish targets replaced (validated as the spec's own would be)."""
    publish = PublishSpec.model_validate({**cell.spec.publish.model_dump(mode="json"), "targets": list(targets)})
    return cell.model_copy(update={"spec": cell.spec.model_copy(update={"publish": publish})})


def raise_if_failed(name: str, results: Sequence[CellResult]) -> None:
    failed = [r for r in results if not r.ok]
    if failed:
        raise MatrixFailed(f"matrix {name}: {len(failed)} of {len(results)} cells did not build: "
                           + "; ".join(f"{r.name} ({r.status})" for r in failed))


@flow(name="build-matrix", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=MAX_PARALLEL))  # type: ignore[arg-type]
def build_matrix(matrix: str = "images/nightly.yaml", only: list[str] | None = None, output: str = "output",
                 boot_test: bool = True, deployment: str | None = None,
                 options: BuildOptions | None = None) -> list[CellResult]:
    """Build every cell of `matrix` (or those `only` selects, e.g. ["arch=amd64,release=trixie"]), each
    cell into `<output>/<cell name>/`, in parallel within each host's slots.

    `deployment` None builds the cells as subflows of this run, on this host (`kiln matrix`); a
    deployment name (`build-on-host/build-image`) creates a run of it per cell, which the work pool's
    workers pick up. A failed cell does not stop the others; the run fails at the end if any did.
    """
    options = options or BuildOptions()
    guard_remote_run(None, options, extra=[("matrix", matrix), ("output", output)])
    base = options.model_copy(update={"boot_test": boot_test and options.boot_test})
    name, results = run_matrix(matrix, only=only or [], output=output, options=base, deployment=deployment)
    raise_if_failed(name, results)
    return results
