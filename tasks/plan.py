"""plan: resolve elements and compute every step's content key."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

from prefect import get_run_logger, task

from kiln.build.customize import BuildContext, check_break
from kiln.build.plan import make_plan
from kiln.model.options import BuildOptions
from kiln.model.spec import ImageSpec
from kiln.store.entries import Store
from kiln.store.gc import claim_workdir


def new_build_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


# not persisted: the context holds the spec, whose secrets must never be written to result storage
@task(name="plan", persist_result=False)
def plan_build(spec: ImageSpec, options: BuildOptions, build_id: str) -> BuildContext:
    logger = get_run_logger()
    plan = make_plan(spec, elements_path=options.elements_path, dib_elements=options.dib_elements)
    store = Store(Path(options.cache) if options.cache else None)
    workdir = store.work_root / build_id
    claim_workdir(workdir)
    by_origin: dict[str, list[str]] = {}
    for e in plan.elements:
        by_origin.setdefault(e.origin, []).append(e.name)
    logger.info("plan: elements %s", "; ".join(f"from {origin}: {', '.join(names)}"
                                               for origin, names in sorted(by_origin.items())))
    logger.info("mirror: %s; %d steps; store %s", plan.mirror, len(plan.steps), store.root)
    return BuildContext(plan=plan, store=store, workdir=workdir, rebuild=options.no_cache,
                        break_at=check_break(options.break_at))
