"""plan: resolve elements and compute every step's content key."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import task
from prefect.blocks.system import Secret
from pydantic import SecretStr

from kiln.build.customize import BuildContext, check_break
from kiln.build.plan import make_plan, take_over
from kiln.model.errors import SpecError
from kiln.model.options import BuildOptions
from kiln.model.record import new_build_id as new_build_id  # the flow's, too
from kiln.model.spec import ImageSpec
from kiln.model.urls import without_credentials
from kiln.store.entries import Store
from kiln.store.gc import claim_workdir

log = logging.getLogger("kiln.plan")  # forwarded to the run's logs (PREFECT_LOGGING_EXTRA_LOGGERS)


def with_secret_blocks(spec: ImageSpec) -> ImageSpec:
    """`spec` with the values of the Prefect Secret blocks it names (`secret_blocks`) among its secrets: read
    here, on the host that builds, so that they never are a run's parameters (stored in Prefect's database)."""
    if not spec.secret_blocks:
        return spec
    loaded = {}
    for variable, block in sorted(spec.secret_blocks.items()):
        try:
            value = Secret.load(block).get()  # type: ignore[union-attr]
        except ValueError as exc:  # Prefect's "Unable to find block document named …"
            raise SpecError(f"spec.secret_blocks.{variable}: no Prefect Secret block named {block!r} "
                            f"({str(exc)[:200]})") from None
        loaded[variable] = SecretStr(value if isinstance(value, str) else str(value))
    log.info("secrets %s from Prefect Secret blocks", ", ".join(sorted(loaded)))
    return spec.model_copy(update={"secrets": {**spec.secrets, **loaded}})


# not persisted: the context holds the spec, whose secrets must never be written to result storage
@task(name="plan", persist_result=False)
def plan_build(spec: ImageSpec, options: BuildOptions, build_id: str) -> BuildContext:
    spec = with_secret_blocks(spec)
    handed = take_over(options.plan_ref)  # the plan `kiln build` made in this process, if it did
    if handed is not None and handed.spec == spec:
        plan = handed
    else:
        plan = make_plan(spec, elements_path=options.elements_path, dib_elements=options.dib_elements)
    store = Store(Path(options.cache) if options.cache else None)
    workdir = store.work_root / build_id
    claim_workdir(workdir)
    by_origin: dict[str, list[str]] = {}
    for e in plan.elements:
        by_origin.setdefault(e.origin, []).append(e.name)
    log.info("elements %s", "; ".join(f"from {origin}: {', '.join(names)}"
                                      for origin, names in sorted(by_origin.items())))
    log.info("mirror: %s; %d steps; store %s", without_credentials(plan.mirror), len(plan.steps), store.root)
    return BuildContext(plan=plan, store=store, workdir=workdir, rebuild=options.no_cache,
                        break_at=check_break(options.break_at))
