"""boot_test: boot the image under local QEMU (KVM where it really works, TCG otherwise), or in a cloud's Nova."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from kiln.boot import nova
from kiln.boot.conformance import Suite, summary
from kiln.boot.local import boot_checked, boot_key, console_kept, serial_log_of
from kiln.build.customize import BuildContext
from kiln.host.state import state_dir
from kiln.image.convert import ImageOutput
from kiln.model.errors import BootTestError
from kiln.model.record import BootOutcome, BuildRecord
from kiln.store.entries import FAILED_BOOTS
from tasks.common import store_key


def _key(p: dict[str, object]) -> tuple[BuildContext, list[str]]:
    ctx: BuildContext = p["ctx"]  # type: ignore[assignment]
    image: ImageOutput = p["image"]  # type: ignore[assignment]
    spec = ctx.plan.spec
    suite: Suite = p["suite"]  # type: ignore[assignment]
    return ctx, [boot_key(image.sha256, str(p["firmware"]), spec.arch.value, spec.boot_test, suite)]


@task(name="boot_test", task_run_name="boot_test {firmware}", persist_result=True, cache_key_fn=store_key(_key))
def boot_test(ctx: BuildContext, image: ImageOutput, firmware: str, kernel: Path | None, suite: Suite) -> BootOutcome:
    """Boot under `firmware` and run the conformance `suite` in the guest. Without cloud-init (the suite says
    so) nothing reads the seed: the boot is judged by systemd's multi-user target and a login prompt."""
    spec = ctx.plan.spec
    try:
        outcome = boot_checked(ctx.store, image.path, image.sha256, firmware=firmware, arch=spec.arch.value,
                               settings=spec.boot_test, workdir=ctx.workdir, state_dir=state_dir(), kernel=kernel,
                               rebuild=ctx.rebuild, suite=suite)
    except BootTestError as exc:
        # the console the error names is in the build's work directory, which goes when the build ends: keep
        # a copy where the operator can read it, and name that one
        serial = serial_log_of(ctx.workdir, firmware)
        if serial.is_file() and str(serial) in str(exc):
            raise console_kept(exc, serial, ctx.store.root / FAILED_BOOTS / f"{ctx.workdir.name}-{firmware}.log") \
                from None
        raise
    get_run_logger().info("boot test %s: passed in %.0f s (%s; judged by %s%s)%s", firmware, outcome.seconds,
                          outcome.accel, outcome.criterion,
                          f"; conformance {summary(outcome.checks)}" if outcome.checks else "",
                          " [cached]" if outcome.cached else "")
    return outcome


# Never cached: a boot in the cloud is the cloud's verdict today (its hypervisors, its Nova), and the server
# it makes is deleted whatever happens, also when this run is cancelled (SIGTERM is handled in kiln.boot.nova).
@task(name="boot_test_nova", task_run_name="boot_test nova {cloud}")
def boot_test_nova(cloud: str | None, image_id: str | None = None, *, build: BuildRecord | None = None,
                   clouds_yaml: Path | None = None, flavor: str | None = None, network: str | None = None,
                   timeout: int | None = None, suite: Suite | None = None,
                   ssh_login: bool = False) -> nova.NovaBootResult:
    """Boot in the Nova of `cloud`: the Glance image `image_id` (a publish candidate), or else the image of
    the finished `build` (as already in Glance, or uploaded for the test and deleted after)."""
    if image_id is not None:
        result = nova.boot_candidate(cloud, image_id, clouds_yaml=clouds_yaml, flavor=flavor, network=network,
                                     timeout=timeout, suite=suite, ssh_login=ssh_login)
    elif build is not None:
        result = nova.boot_test_output(build, cloud=cloud, clouds_yaml=clouds_yaml, flavor=flavor,
                                       network=network, timeout=timeout, suite=suite)
    else:
        raise ValueError("boot_test_nova needs an image_id or a build output")
    get_run_logger().info("boot test in Nova on %s: passed in %.0f s (server %s, flavor %s, network %s%s)",
                          result.cloud, result.seconds, result.server_id, result.flavor, result.network,
                          f"; root's SSH login at {result.address}: ok" if result.ssh_ok else "")
    return result
