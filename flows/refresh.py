"""nightly_refresh: the catalog rebuilt from the mirror every night, and what changed published.

    every cell of the matrix built (flows/matrix.py: in parallel, within each host's slots, on the build
      hosts' workers); each cell publishes at the end of its own build, on the host that built it, to
      the matrix's `publish:` targets (or `publish_targets`), only where the stable image lacks its
      content, with a package diff against the stable it replaces (kiln/publish/refresh.py)
    -> the summary artifact and <output>/matrix.json: per cell built or failed, published or unchanged,
       the package changes
    -> fail the run if any cell failed to build or to publish, naming them, after the others are done

Scheduled by the `nightly-refresh` deployment (deployments/prefect.yaml, 02:00 UTC); `kiln refresh` runs
the same flow in its own process.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows.guard import guard_remote_run
from flows.matrix import BUILD_DEPLOYMENT, MAX_PARALLEL, raise_if_failed, run_matrix
from kiln.model.matrix import CellResult, publish_text
from kiln.model.options import BuildOptions


@flow(name="nightly-refresh", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=MAX_PARALLEL))  # type: ignore[arg-type]
def nightly_refresh(matrix: str = "images/nightly.yaml", only: list[str] | None = None,
                    output: str = "output/nightly", boot_test: bool = True,
                    deployment: str | None = BUILD_DEPLOYMENT,
                    publish_targets: list[str] | None = None) -> list[CellResult]:
    """Rebuild every cell of `matrix` and publish the ones whose content changed.

    `deployment` (default: the `build-image` deployment) spreads the cells over the work pool's workers;
    None builds them here, one subflow per cell. `publish_targets` (glance:CLOUD, s3://BUCKET/PREFIX)
    replaces the targets of the matrix's `publish:` section.
    """
    logger = get_run_logger()
    guard_remote_run(None, None, extra=[("matrix", matrix), ("output", output)])
    options = BuildOptions(boot_test=boot_test, only_changed=True)
    name, results = run_matrix(matrix, only=only or [], output=output, options=options, deployment=deployment,
                               publish_targets=publish_targets)
    if not any(r.published for r in results) and all(r.ok for r in results):
        logger.warning("refresh %s: no publish targets (the matrix has no publish: section and none were given): "
                       "nothing published", name)
    for r in results:
        logger.info("refresh %s: %s: %s, %s", name, r.name, r.status, publish_text(r) if r.ok else r.error)
    raise_if_failed(name, results)
    return results
