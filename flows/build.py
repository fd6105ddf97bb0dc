"""build_image: one image spec to a bootable, boot-tested cloud image.

    plan -> fetch_base -> customize (phase by phase, every hook a cached layer) -> pack -> convert
    (one task per format) -> boot_test (one per firmware) -> outputs (images, manifest.json, SHA256SUMS)
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import Task, flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State

from kiln.boot.local import BootOutcome, boot_firmware, has_cloud_init, nova_outcome
from kiln.build.elements import PHASES
from kiln.host.run import terminate_all
from kiln.model.options import BuildOptions
from kiln.model.spec import BootBackend, ImageSpec
from kiln.store.gc import release_workdir
from tasks.boot_test import boot_test, boot_test_nova
from tasks.convert import convert_image
from tasks.customize import customize_phase
from tasks.fetch_base import fetch_base
from tasks.outputs import record_boot_tests, write_outputs
from tasks.pack import pack_disk
from tasks.plan import new_build_id, plan_build
from tasks.publish import publish_build

Stages = dict[str, dict[str, Any]]


def _stage(stages: Stages, name: str, task: Task[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a stage's task, record its wall time and whether Prefect served it from the cache."""
    start = time.monotonic()
    state: State[Any] = task(*args, return_state=True, **kwargs)  # type: ignore[assignment]
    result = state.result()
    stages[name] = {"seconds": round(time.monotonic() - start, 2), "cached": state.name == "Cached"}
    return result


def _boot_in_nova(stages: Stages, spec: ImageSpec, output: str) -> BootOutcome:
    """The finished build booted in the Nova of boot_test.cloud, as a temporary image."""
    bt = spec.boot_test
    result = _stage(stages, "boot_test nova", boot_test_nova, bt.cloud, None, output=output, flavor=bt.flavor,
                    network=bt.network, timeout=bt.timeout)
    # what the cloud booted it with, as the guest's kernel reported it (not what kiln expected)
    return nova_outcome(result, firmware=result.firmware, console_log=Path(output) / "boot-nova-console.log")


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
        boot_wanted = options.boot_test and spec.boot_test.enabled
        in_nova = boot_wanted and spec.boot_test.backend == BootBackend.nova
        publishing = options.publish and bool(spec.publish.targets)
        gate_in_nova = in_nova and publishing and bool(spec.publish.glance_clouds)
        if in_nova:
            logger.info("boot test in Nova: %s", "the candidate, before promotion" if gate_in_nova else
                        f"a temporary image in cloud {spec.boot_test.cloud}")
        elif boot_wanted:
            bootable = next((i for i in images if i.format == "qcow2"), images[0])
            for firmware in boot_firmware(spec):
                name = f"boot_test {firmware}"
                outcome = _stage(stages, name, boot_test, ctx, bootable, firmware, packed.kernel,
                                 has_cloud_init(packed.packages))
                # Prefect's cached result is the outcome of the run that booted: mark it as not booted now
                boots.append(replace(outcome, cached=True) if stages[name]["cached"] else outcome)
        else:
            logger.info("boot test skipped")

        report = write_outputs(ctx, options, build_id, packed, images, boots, stages)
        if in_nova and not gate_in_nova:
            report = record_boot_tests(report, [_boot_in_nova(stages, spec, report["output"])])
        if publishing:
            # the gate reads the boot results this run wrote into the manifest, or boots the candidate in Nova
            report["published"] = publish_build(report["output"], spec.publish, "nova" if gate_in_nova else None,
                                                only_changed=options.only_changed)
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
