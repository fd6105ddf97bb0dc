"""nightly_refresh: the catalog rebuilt from the mirror every night, then promotion.

    build every cell of the nightly matrix (flows/matrix.py: in parallel, within each host's slots)
    -> publish_built: the promotion hook (kiln/publish.py: Glance and S3, promote only what booted,
       keep the previous good image for rollback, rotate older ones)
    -> fail the run if any cell failed, after the others were built and published

Scheduled by the `nightly-refresh` deployment (deployments/prefect.yaml, 02:00 UTC).
"""

from __future__ import annotations

from collections.abc import Sequence

from prefect import flow, get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner

from flows.matrix import BUILD_DEPLOYMENT, MAX_PARALLEL, raise_if_failed, run_matrix
from kiln.matrix import CellResult
from kiln.options import BuildOptions


@task(name="publish")
def publish_built(cells: Sequence[CellResult], *, target: str | None) -> list[str]:
    """PUBLISHING HOOK: promote the cells that built (and booted, when boot tests ran).

    kiln/publish.py (another engineer's) plugs in here: publish each cell's images and manifest to
    `target`, promote them only once they booted, keep the previous good image, rotate older ones.
    Until then it logs what it would publish and publishes nothing. Returns what was published.
    """
    logger = get_run_logger()
    ready = [c for c in cells if c.ok and all(b.get("passed") for b in c.boot_test)]
    if target is None:
        logger.info("publishing not configured (no target): %d of %d cells ready: %s", len(ready), len(cells),
                    ", ".join(c.name for c in ready) or "none")
        return []
    logger.warning("publishing to %s is not implemented yet (kiln/publish.py); would publish: %s", target,
                   ", ".join(c.name for c in ready) or "none")
    return []


@flow(name="nightly-refresh", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=MAX_PARALLEL))  # type: ignore[arg-type]
def nightly_refresh(matrix: str = "images/nightly.yaml", only: list[str] | None = None,
                    output: str = "output/nightly", boot_test: bool = True,
                    deployment: str | None = BUILD_DEPLOYMENT, publish_target: str | None = None) -> list[CellResult]:
    """Rebuild every image of the nightly matrix and publish what built and booted.

    `deployment` (default: the `build-image` deployment) spreads the cells over the work pool's workers;
    None builds them here, one subflow per cell. `publish_target` names where `publish_built` publishes.
    """
    name, results = run_matrix(matrix, only=only or [], output=output,
                               options=BuildOptions(boot_test=boot_test), deployment=deployment)
    publish_built(results, target=publish_target)
    raise_if_failed(name, results)
    return results
