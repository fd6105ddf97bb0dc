"""boot_test: boot the image under local QEMU (KVM where it really works, TCG otherwise)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from kiln.boottest import BootOutcome, boot_checked, boot_key
from kiln.convert import ImageOutput
from kiln.customize import BuildContext
from kiln.prefect_server import state_dir
from tasks.common import store_key


def _key(p: dict[str, object]) -> tuple[BuildContext, list[str]]:
    ctx: BuildContext = p["ctx"]  # type: ignore[assignment]
    image: ImageOutput = p["image"]  # type: ignore[assignment]
    spec = ctx.plan.spec
    return ctx, [boot_key(image.sha256, str(p["firmware"]), spec.arch.value, spec.boot_test)]


@task(name="boot_test", task_run_name="boot_test {firmware}", persist_result=True, cache_key_fn=store_key(_key))
def boot_test(ctx: BuildContext, image: ImageOutput, firmware: str, kernel: Path | None) -> BootOutcome:
    spec = ctx.plan.spec
    outcome = boot_checked(ctx.store, image.path, image.sha256, firmware=firmware, arch=spec.arch.value,
                           settings=spec.boot_test, workdir=ctx.workdir, state_dir=state_dir(), kernel=kernel,
                           rebuild=ctx.rebuild)
    get_run_logger().info("boot test %s: passed in %.0f s (%s)%s", firmware, outcome.seconds, outcome.accel,
                          " [cached]" if outcome.cached else "")
    return outcome
