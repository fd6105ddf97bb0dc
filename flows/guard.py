"""What a run that came from a deployment (the Prefect UI's form, the API, a schedule) may ask of the host its
worker runs on: kiln.model.hostpaths says what, this module applies it to the running flow."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from prefect.context import FlowRunContext
from prefect.runtime import flow_run

from kiln.model.hostpaths import ALLOWED_ENV, allowed_roots, check_remote_run
from kiln.model.options import BuildOptions
from kiln.model.spec import ImageSpec

# under the checkout the worker runs in: where kiln's own specs, matrix files and elements are, and where its
# deployments write by default. Not the store (it holds strangers' trees), not the whole checkout (.venv)
DEFAULT_ROOTS = ("output", "images", "elements")


def from_deployment() -> bool:
    """Whether the running flow run was created from a deployment, or is a subflow of one (a matrix's cell
    built in its run), rather than started by `kiln build` or `kiln matrix` on the host."""
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return False
    if ctx.flow_run.deployment_id is not None:
        return True
    return flow_run.parent_deployment_id is not None


def guard_remote_run(spec: ImageSpec | None, options: BuildOptions | None,
                     extra: Iterable[tuple[str, str]] = ()) -> None:
    """Refuse (SpecError naming the field) what a deployment's run may not ask of this host: paths outside
    KILN_ALLOWED_PATHS (by default the checkout's output/, images/ and elements/ only), a shell, secret values."""
    if not from_deployment():
        return
    cwd = Path.cwd()
    roots = allowed_roots(os.environ.get(ALLOWED_ENV), [cwd / d for d in DEFAULT_ROOTS])
    check_remote_run(spec, options, roots=roots, cwd=cwd, extra=extra)
