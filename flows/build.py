"""build_image: one image spec to a bootable, boot-tested cloud image.

    plan -> fetch_base -> customize (phase by phase, every hook a cached layer) -> pack -> convert
    (one task per format) -> boot_test (one per firmware) -> outputs (images, manifest.json, SHA256SUMS)
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from prefect import Task, flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State

from kiln.boottest import boot_firmware
from kiln.elements import PHASES
from kiln.gc import release_workdir
from kiln.options import BuildOptions
from kiln.run import terminate_all
from kiln.spec import ImageSpec
from tasks.boot_test import boot_test
from tasks.convert import convert_image
from tasks.customize import customize_phase
from tasks.fetch_base import fetch_base
from tasks.outputs import write_outputs
from tasks.pack import pack_disk
from tasks.plan import new_build_id, plan_build
from tasks.publish import publish_build

Stages = dict[str, dict[str, Any]]


def _stage(stages: Stages, name: str, task: Task[..., Any], *args: Any) -> Any:
    """Run a stage's task, record its wall time and whether Prefect served it from the cache."""
    start = time.monotonic()
    state: State[Any] = task(*args, return_state=True)  # type: ignore[assignment]
    result = state.result()
    stages[name] = {"seconds": round(time.monotonic() - start, 2), "cached": state.name == "Cached"}
    return result


@flow(name="build-image", log_prints=True, persist_result=True)
def build_image(spec: ImageSpec, options: BuildOptions | None = None) -> dict[str, Any]:
    """Build `spec`: bootstrap, customize with elements, pack, convert, boot-test, write the outputs."""
    options = options or BuildOptions()
    logging.getLogger("kiln").setLevel(logging.INFO)  # worker-started runs configure no logging of their own
    logger = get_run_logger()
    build_id = new_build_id()
    stages: Stages = {}

    ctx = _stage(stages, "plan", plan_build, spec, options, build_id)
    try:
        _stage(stages, "fetch_base", fetch_base, ctx)
        for phase in PHASES:
            if ctx.plan.phase_steps(phase):
                _stage(stages, f"customize {phase}", customize_phase, ctx, phase)
        packed = _stage(stages, "pack", pack_disk, ctx)

        start = time.monotonic()
        futures = [convert_image.submit(ctx, packed, fmt.value) for fmt in spec.formats]
        images = [f.result() for f in futures]
        stages["convert"] = {"seconds": round(time.monotonic() - start, 2),
                             "cached": all(f.state.name == "Cached" for f in futures)}

        boots = []
        if options.boot_test and spec.boot_test.enabled:
            bootable = next((i for i in images if i.format == "qcow2"), images[0])
            for firmware in boot_firmware(spec):
                name = f"boot_test {firmware}"
                outcome = _stage(stages, name, boot_test, ctx, bootable, firmware, packed.kernel)
                # Prefect's cached result is the outcome of the run that booted: mark it as not booted now
                boots.append(replace(outcome, cached=True) if stages[name]["cached"] else outcome)
        else:
            logger.info("boot test skipped")

        report = write_outputs(ctx, options, build_id, packed, images, boots, stages)
        if options.publish and spec.publish.targets:
            # the gate reads the boot results this run just wrote into the manifest
            report["published"] = publish_build(report["output"], spec.publish)
    except BaseException:
        # a cancelled run (Prefect's TerminationSignal), Ctrl-C or a failure: children of tasks in other
        # threads (conversions) are not interrupted by the exception, so kill them before tearing down
        terminate_all()
        raise
    finally:
        release_workdir(ctx.workdir)
    create_markdown_artifact(key=f"build-{spec.name}".lower().replace(".", "-").replace("_", "-"),
                             markdown=report["summary"], description=f"kiln build of {spec.name}")
    return report
