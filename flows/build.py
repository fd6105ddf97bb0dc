"""build_image: one image spec to a bootable, boot-tested cloud image.

    plan -> fetch_base -> customize (phase by phase, every hook a cached layer) -> pack -> convert
    (one task per format) -> boot_test (one per firmware) -> outputs (images, manifest.json, SBOMs, SHA256SUMS
    signed; signed again when the boot tests in Nova or publishing add to the manifest)
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from prefect import Task, flow
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import State
from prefect.runtime import flow_run

from flows.guard import guard_remote_run
from kiln.boot.conformance import Suite, suite_for
from kiln.boot.local import boot_firmware, nova_outcome
from kiln.build.elements import PHASES
from kiln.host.run import terminate_all
from kiln.model.options import BuildOptions
from kiln.model.record import BootOutcome, BuildRecord
from kiln.model.spec import BootBackend, ImageSpec
from kiln.publish.gates import build_gate
from kiln.publish.manifest import markdown_summary
from kiln.store.gc import release_workdir
from tasks.boot_test import boot_test, boot_test_nova
from tasks.convert import convert_image
from tasks.customize import customize_phase
from tasks.fetch_base import fetch_base
from tasks.outputs import record_boot_tests, record_published, write_outputs
from tasks.pack import pack_disk
from tasks.plan import new_build_id, plan_build
from tasks.publish import publish_build

Stages = dict[str, dict[str, Any]]
log = logging.getLogger("kiln.build")


def _stage(stages: Stages, name: str, task: Task[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a stage's task, record its wall time and whether Prefect served it from the cache, and say so in
    one line that names the stage."""
    start = time.monotonic()
    state: State[Any] = task.with_options(task_run_name=name)(*args, return_state=True, **kwargs)  # type: ignore[assignment]
    try:
        result = state.result()
    except BaseException:
        log.error("%s: failed after %.1f s", name, time.monotonic() - start)
        raise
    _record(stages, name, start, cached=state.name == "Cached")
    return result


def _record(stages: Stages, name: str, start: float, *, cached: bool) -> None:
    seconds = round(time.monotonic() - start, 2)
    stages[name] = {"seconds": seconds, "cached": cached}
    log.info("%s: %s in %.1f s", name, "cached" if cached else "done", seconds)


def stage_table(record: BuildRecord) -> str:
    """The build's stages with their seconds and whether each came from the cache, as the manifest has them."""
    width = max((len(n) for n in record.timings), default=5)
    rows = [f"  {'stage':<{width}}  {'seconds':>8}  cached"]
    rows += [f"  {name:<{width}}  {t.seconds:>8.1f}  {'yes' if t.cached else 'no'}"
             for name, t in record.timings.items()]
    return "\n".join(rows)


def _boot_in_nova(stages: Stages, spec: ImageSpec, record: BuildRecord, suite: Suite) -> BootOutcome:
    """The finished build booted in the Nova of boot_test.cloud, as a temporary image, with the conformance
    suite (the elements' checks included)."""
    bt = spec.boot_test
    result = _stage(stages, "boot_test nova", boot_test_nova, bt.cloud, None, build=record, flavor=bt.flavor,
                    network=bt.network, timeout=bt.timeout, suite=suite)
    # what the cloud booted it with, as the guest's kernel reported it (not what kiln expected)
    assert record.output is not None
    return nova_outcome(result, firmware=result.firmware, console_log=record.output / "boot-nova-console.log")


def build_run_name() -> str:
    """The flow run's name: the image's and the build's (Prefect's UI lists runs by it)."""
    params = flow_run.parameters
    spec = params.get("spec")
    name = spec.name if isinstance(spec, ImageSpec) else (spec or {}).get("name", "image")
    return f"{name}-{params.get('build_id') or 'build'}"


@flow(name="build-image", flow_run_name=build_run_name, log_prints=True, persist_result=True)
def build_image(spec: ImageSpec, options: BuildOptions | None = None, build_id: str | None = None) -> BuildRecord:
    """Build `spec`: bootstrap, customize with elements, pack, convert, boot-test, write the outputs."""
    options = options or BuildOptions()
    # a run from the UI or the API (or a cell of one): only what the worker's host allows, before anything
    guard_remote_run(spec, options)
    # kiln's level is the caller's: INFO from kiln/__init__ (a worker's run), DEBUG with -v, WARNING with -q
    build_id = build_id or new_build_id()
    stages: Stages = {}

    ctx = _stage(stages, "plan", plan_build, spec, options, build_id)
    try:
        _stage(stages, "fetch_base", fetch_base, ctx)
        for phase in PHASES:
            if ctx.plan.phase_steps(phase):
                _stage(stages, f"customize {phase}", customize_phase, ctx, phase)
        packed = _stage(stages, "pack", pack_disk, ctx)

        start = time.monotonic()
        futures = [convert_image.with_options(task_run_name=f"convert {fmt.value}").submit(ctx, packed, fmt.value)
                   for fmt in spec.formats]
        images = [f.result() for f in futures]
        _record(stages, "convert", start, cached=all(f.state.name == "Cached" for f in futures))

        boots = []
        boot_wanted = options.boot_test and spec.boot_test.enabled
        in_nova = boot_wanted and spec.boot_test.backend == BootBackend.nova
        publishing = options.publish and bool(spec.publish.targets)
        gate = build_gate(in_nova, spec.publish) if publishing else None
        gate_in_nova = gate == "nova"
        if in_nova:
            log.info("boot_test: in Nova: %s", "the candidate, before promotion" if gate_in_nova else
                     f"a temporary image in cloud {spec.boot_test.cloud}")
        elif boot_wanted:
            bootable = next((i for i in images if i.format == "qcow2"), images[0])
            suite = suite_for(ctx.plan, packed.packages)
            for firmware in boot_firmware(spec):
                name = f"boot_test {firmware}"
                outcome = _stage(stages, name, boot_test, ctx, bootable, firmware, packed.kernel, suite)
                # Prefect's cached result is the outcome of the run that booted: mark it as not booted now
                boots.append(replace(outcome, cached=True) if stages[name]["cached"] else outcome)
        else:
            log.info("boot_test: skipped")

        record = write_outputs(ctx, options, build_id, packed, images, boots, stages)
        if in_nova and not gate_in_nova:
            suite = suite_for(ctx.plan, packed.packages)
            record = record_boot_tests(record, [_boot_in_nova(stages, spec, record, suite)], stages)
        if publishing:
            # the gate reads the boot results this run wrote into the record, or boots the candidate in Nova
            report = _stage(stages, "publish", publish_build, record, spec.publish, gate,
                            only_changed=options.only_changed)
            record = record_published(record, report)
    except BaseException:
        # a cancelled run (Prefect's TerminationSignal), Ctrl-C or a failure: children of tasks in other
        # threads (conversions) are not interrupted by the exception, so kill them before tearing down
        terminate_all()
        raise
    finally:
        release_workdir(ctx.workdir)
    create_markdown_artifact(key=f"build-{spec.name}".lower().replace(".", "-").replace("_", "-"),
                             markdown=markdown_summary(record), description=f"kiln build of {spec.name}")
    log.info("build %s: stages\n%s", build_id, stage_table(record))
    return record
