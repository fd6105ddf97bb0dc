"""What a run that came from a deployment (the Prefect UI's form, the API, a schedule) may ask of the host its
worker runs on: kiln.model.hostpaths says what, this module applies it to the running flow."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from prefect.context import FlowRunContext

from kiln.model.hostpaths import ALLOWED_ENV, allowed_roots, check_remote_run
from kiln.model.options import BuildOptions
from kiln.model.spec import ImageSpec
from kiln.store.entries import default_root


def from_deployment() -> bool:
    """Whether the running flow run was created from a deployment (not by `kiln build` or `kiln matrix`)."""
    ctx = FlowRunContext.get()
    return ctx is not None and ctx.flow_run is not None and ctx.flow_run.deployment_id is not None


def guard_remote_run(spec: ImageSpec | None, options: BuildOptions | None,
                     extra: Iterable[tuple[str, str]] = ()) -> None:
    """Refuse (SpecError naming the field) what a deployment's run may not ask of this host: paths outside
    KILN_ALLOWED_PATHS (default: the checkout the worker runs in, and its cache), a shell, secret values."""
    if not from_deployment():
        return
    cwd = Path.cwd()
    roots = allowed_roots(os.environ.get(ALLOWED_ENV), [cwd, default_root()])
    check_remote_run(spec, options, roots=roots, cwd=cwd, extra=extra)
