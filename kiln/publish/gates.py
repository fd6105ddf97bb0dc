"""The boot gate: what must be true of a build (or of its uploaded candidate) before it is promoted.

The one place a gate is chosen: `choose_gates`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from kiln.boot import nova
from kiln.boot.conformance import Suite, suite_of_build, summary
from kiln.boot.local import run_boot_test_of_output
from kiln.boot.nova import NovaBootResult
from kiln.model.errors import KilnError
from kiln.model.publishing import PublishInputError, PublishSpec
from kiln.model.record import BuildRecord, ImageRecord

if TYPE_CHECKING:
    pass

log = logging.getLogger("kiln.publish")

# ---------------------------------------------------------------------------------------------------
# The boot gate


@dataclass(frozen=True)
class CandidateImage:
    """What a gate is asked about: the build's image and, for a Glance target, the uploaded candidate."""

    name: str
    build: BuildRecord
    image: ImageRecord
    cloud: str | None = None
    image_id: str | None = None
    clouds_yaml: Path | None = None


@dataclass(frozen=True)
class GateResult:
    passed: bool
    detail: str
    log_tail: tuple[str, ...] = ()


Gate = Callable[[CandidateImage], GateResult]


class NovaBoot(Protocol):
    def __call__(self, cloud: str | None, image_id: str, *, clouds_yaml: Path | None, flavor: str | None,
                 network: str | None, timeout: int | None, suite: Suite | None,
                 ssh_login: bool = False) -> NovaBootResult: ...


def manifest_gate(candidate: CandidateImage) -> GateResult:
    """The boot test as the build recorded it: every firmware the spec asked for booted under QEMU, or the
    image booted in a cloud's Nova (boot_test.backend nova)."""
    build = candidate.build
    boots = build.boot_test
    if not boots:
        return GateResult(False, "the build was not boot-tested (built with --no-boot-test?): nothing proves it "
                                 "boots; rebuild with the boot test, or publish with --gate none")
    wanted = build.boot_settings.get("firmware") or []
    failed = [b.firmware for b in boots if not b.passed]
    if failed:
        tail = tuple(line for b in boots if not b.passed for line in b.tail[-20:])
        return GateResult(False, f"the boot test failed under {', '.join(failed)}", tail)
    # a boot in the cloud's Nova stands for the image, whatever firmware the cloud chose for it
    booted_in_nova = any(b.backend == "nova" for b in boots)
    missing = [] if booted_in_nova else [f for f in wanted if f not in {b.firmware for b in boots}]
    if missing:
        return GateResult(False, f"no boot test result for {', '.join(missing)}")
    return GateResult(True, "booted to cloud-init's end under " +
                      ", ".join(f"{b.firmware} ({b.accel}, {b.seconds:.0f} s)" for b in boots))


def qemu_gate(candidate: CandidateImage) -> GateResult:
    """Boot the build's image now under local QEMU, every firmware of its spec (minutes under TCG): for a
    build made with --no-boot-test, or to check again before promoting."""

    try:
        outcomes = run_boot_test_of_output(candidate.build)
    except (KilnError, ValueError) as exc:  # ValueError: pydantic's, for a spec this kiln cannot read
        lines = str(exc).splitlines()
        return GateResult(False, f"the local QEMU boot failed: {lines[0]}", tuple(lines[1:]))
    return GateResult(True, "booted under local QEMU: " +
                      ", ".join(f"{o.firmware} ({o.accel}, {o.seconds:.0f} s)" for o in outcomes))


def no_gate(candidate: CandidateImage) -> GateResult:
    return GateResult(True, "no gate: promoted without a boot check, as the operator asked")


def nova_gate(candidate: CandidateImage, boot: NovaBoot | None = None, *, flavor: str | None = None,
              network: str | None = None) -> GateResult:
    """Boot the uploaded candidate in the cloud's own Nova (its firmware, disk bus, config drive) until
    cloud-init has finished; the server is deleted whatever happens. Flavor and network: the ones given
    (kiln publish --flavor/--network), else the spec's boot_test, else kiln/boot/nova.py's defaults. `boot`
    is nova.boot_candidate, or the flow's Prefect task."""

    if candidate.cloud is None or candidate.image_id is None:
        return GateResult(False, "the nova gate boots the uploaded candidate: publish to a glance:CLOUD target "
                                 "whose cloud has Nova")
    settings = candidate.build.boot_settings
    boot = boot or nova.boot_candidate
    try:
        result = boot(candidate.cloud, candidate.image_id, clouds_yaml=candidate.clouds_yaml,
                      flavor=flavor or settings.get("flavor"), network=network or settings.get("network"),
                      timeout=int(settings.get("timeout") or nova.DEFAULT_BOOT_TIMEOUT),
                      suite=suite_of_build(candidate.build), ssh_login=bool(settings.get("ssh_login")))
    except nova.NovaBootError as exc:
        return GateResult(False, f"the Nova boot failed: {exc.reason}", tuple(exc.tail))
    return GateResult(True, f"booted in Nova on {result.cloud} to cloud-init's end (flavor {result.flavor}, "
                            f"network {result.network}, "
                            + (f"root's SSH login at {result.address} ok, " if result.ssh_ok else "")
                            + f"ACTIVE in {result.active_seconds:.0f} s, "
                            f"{result.seconds:.0f} s in all; conformance {summary(result.checks) or 'not run'})")


GATES: dict[str, Gate] = {"manifest": manifest_gate, "qemu": qemu_gate, "none": no_gate, "nova": nova_gate}
# gates that judge the build alone, not the uploaded image: run before uploading anything
LOCAL_GATES: set[Gate] = {manifest_gate, qemu_gate, no_gate}


def run_gate(gate: Gate, candidate: CandidateImage) -> GateResult:
    start = time.monotonic()
    try:
        result = gate(candidate)
    except KilnError as exc:
        result = GateResult(False, f"the gate failed to run: {exc}")
    log.info("gate for %s (%s): %s in %.0f s: %s", candidate.name, candidate.image_id or candidate.image.file,
             "passed" if result.passed else "FAILED", time.monotonic() - start, result.detail)
    return result




def build_gate(boot_in_nova: bool, spec: PublishSpec) -> str | None:
    """The gate a build's own publish stage names: a build whose boot test is in Nova and that goes to Glance
    is boot-tested as the candidate, before promotion, by the `nova` gate; otherwise None (choose_gates
    picks per cloud)."""
    return "nova" if boot_in_nova and spec.glance_clouds else None


def choose_gates(spec: PublishSpec, gate: str | None = None, *, has_compute: Callable[[str], bool],
                 nova_boot: NovaBoot | None = None, flavor: str | None = None,
                 network: str | None = None) -> dict[str, Gate]:
    """The one place a gate is chosen. For each Glance cloud: `gate` when the build says (its boot test
    is the candidate's Nova boot), else Nova for a cloud with a compute endpoint (it boots the candidate
    the way it boots every image) and the verdict of kiln's local boot test recorded in the manifest for
    one without. `nova_boot` runs the Nova boot (the flow's Prefect task); default: nova.boot_candidate."""
    if gate == "nova" and not spec.glance_clouds:
        raise PublishInputError("the nova gate boots the uploaded candidate in a cloud's Nova: publish to a "
                                "glance:CLOUD target, or choose another gate")
    chosen = {}
    for cloud in spec.glance_clouds:
        name = gate or ("nova" if has_compute(cloud) else "manifest")
        nova_settings = nova_boot or flavor or network
        chosen[cloud] = (partial(nova_gate, boot=nova_boot, flavor=flavor, network=network)
                         if name == "nova" and nova_settings else GATES[name])
    return chosen
