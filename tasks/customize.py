"""customize: one phase of element hooks, each hook a cached layer."""

from __future__ import annotations

from prefect import task

from kiln.build.customize import BuildContext, PhaseResult, run_phase
from tasks.common import store_key


@task(name="customize", task_run_name="customize {phase}", persist_result=True,
      cache_key_fn=store_key(lambda p: (p["ctx"], [s.key for s in p["ctx"].plan.phase_steps(p["phase"])])))
def customize_phase(ctx: BuildContext, phase: str) -> PhaseResult:
    return run_phase(ctx, phase)
