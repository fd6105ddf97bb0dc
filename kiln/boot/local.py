"""The local boot test of a finished image, with its result cached by the image's checksum.

An unchanged image is not booted twice: a passed boot is stored under a key made of the image's
sha256, the firmware and the boot settings. A failed boot is never stored.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from kiln.boot import conformance, qemu, seed
from kiln.boot.nova import NovaBootResult
from kiln.build.plan import digest
from kiln.host.arch import host_arch
from kiln.host.checksums import write_replacing
from kiln.host.run import tracked
from kiln.host.state import state_dir
from kiln.model import facts
from kiln.model.checks import CheckOutcome
from kiln.model.errors import BootTestError, SpecError
from kiln.model.record import BootOutcome, BuildRecord
from kiln.model.spec import BootTestSpec, ImageSpec
from kiln.store.entries import Store

log = logging.getLogger("kiln.boot")

BOOT_VERSION = "2"


FOREIGN_ARCH_SLOWDOWN = 3  # a guest of another arch runs under TCG emulation of a foreign ISA


def effective_timeout(settings: BootTestSpec, arch: str) -> int:
    """The spec's boot timeout; when left at its default, stretched for a foreign-arch guest."""
    if arch != host_arch() and "timeout" not in settings.model_fields_set:
        return settings.timeout * FOREIGN_ARCH_SLOWDOWN
    return settings.timeout


BOOT_GENERATION_ENV = "KILN_BOOT_GENERATION"


def boot_key(image_sha256: str, firmware: str, arch: str, settings: BootTestSpec, suite: conformance.Suite) -> str:
    """The key of a passed boot. KILN_BOOT_GENERATION, when set, is part of it: a new value boots every image
    once more (the test suite sets a fresh one per session, so a boot it asserts on ran in that session)."""
    generation = os.environ.get(BOOT_GENERATION_ENV, "")
    return digest({"stage": "boot_test", "version": BOOT_VERSION, "image": image_sha256, "firmware": firmware,
                   "arch": arch, "memory": settings.memory, "cpus": settings.cpus,
                   "root_login": settings.root_login, **({"ssh_login": True} if settings.ssh_login else {}),
                   **({"conformance": suite.key()} if suite.cloud_init else {"criterion": "systemd"}),
                   **({"generation": generation} if generation else {})})


def user_data(marker: str, *, root_password: str | None, suite: conformance.Suite | None = None,
              firmware: str = "bios") -> str:
    """The boot test's cloud-config, with the conformance suite; with a password, it goes to cloud-init's
    default user (`password:`), which is root in an image with the cloud-init-cfg element."""
    text = seed.boot_test_user_data(marker, write_files=conformance.write_files(suite, firmware) if suite else ())
    return text if root_password is None else seed.with_default_user_password(text, root_password)


def boot_firmware(spec: ImageSpec, wanted: list[str] | None = None) -> list[str]:
    """The firmware to boot-test with: the spec's (or `wanted`) that machines of its arch have (arm64: UEFI)."""
    chosen = wanted or [f.value for f in spec.boot_test.firmware]
    able = facts.boot_firmware_of(spec.arch.value)
    return [f for f in chosen if f in able] or ["uefi"]


def boot_once(image: Path, *, firmware: str, arch: str, settings: BootTestSpec, workdir: Path,
              accel: str, suite: conformance.Suite) -> BootOutcome:
    """One local QEMU boot of `image` with a fresh NoCloud seed (marker, the conformance suite, and a root
    password to log in with when the settings ask for it); raises BootTestError unless cloud-init finished
    (and root got in) and every conformance check passed (or is waived), at both boots."""
    cloud_init = suite.cloud_init
    if settings.root_login and not cloud_init:
        raise BootTestError(f"boot test ({firmware}): boot_test.root_login sets root's password through "
                            "cloud-init's user-data, and the image has no cloud-init")
    marker = "KILN-BOOT-" + secrets.token_hex(8)
    password = secrets.token_urlsafe(12) if settings.root_login else None
    boot_dir = serial_log_of(workdir, firmware).parent
    iso = seed.make_nocloud_seed(boot_dir / "seed.iso",
                                 user_data=user_data(marker, root_password=password, suite=suite, firmware=firmware),
                                 meta_data=seed.boot_test_meta_data())
    try:
        with tracked(workdir):
            result = qemu.boot_test(image, firmware=firmware, arch=arch, marker=marker, seed_iso=iso,
                                    workdir=boot_dir, accel=accel, memory_mib=settings.memory,
                                    cpus=settings.cpus, timeout=effective_timeout(settings, arch),
                                    extra_login=("root", password) if password else None,
                                    ssh_login=settings.ssh_login,
                                    criterion="cloud-init" if cloud_init else "systemd",
                                    suite_boots=suite.boots if cloud_init else 0, agent=suite.guest_agent)
    finally:
        iso.unlink(missing_ok=True)
    if settings.root_login and not result.login_ok:
        raise BootTestError(f"boot test ({firmware}): cloud-init finished, but root could not log in with "
                            f"the password set through user-data; console log: {result.serial_log}")
    if settings.ssh_login and not result.ssh_ok:
        raise BootTestError(f"boot test ({firmware}): root logged in on the console, but not over SSH with the "
                            f"password set through user-data (sshd refused it or never answered); console log: "
                            f"{result.serial_log}")
    checks: list[CheckOutcome] = []
    if cloud_init and result.reports is not None:
        host = conformance.host_checks(suite, root_bytes=result.root_bytes, disk_bytes=result.disk_bytes,
                                       agent=result.agent)
        checks = conformance.verdict(suite, result.reports, host, boots=suite.boots, fatal=result.fatal)
        log.info("conformance (%s): %s", firmware, conformance.summary(checks))
        conformance.raise_on_failures(checks, where=f"boot test ({firmware})", serial_log=result.serial_log)
    return BootOutcome(firmware=firmware, passed=result.passed, seconds=round(result.seconds, 1),
                       accel=result.accel, root_bytes=result.root_bytes, disk_bytes=result.disk_bytes,
                       login_ok=result.login_ok, serial_log=str(result.serial_log), ssh_ok=result.ssh_ok,
                       criterion=result.criterion, failed_units=result.failed_units, checks=checks)


def nova_outcome(result: NovaBootResult, *, firmware: str, console_log: Path) -> BootOutcome:
    """A passed boot in a cloud's Nova as a boot test result of the build; its console kept in `console_log`."""
    write_replacing(console_log, result.console)
    return BootOutcome(firmware=firmware, passed=result.passed, seconds=result.seconds,
                       accel=f"nova on {result.cloud} ({result.flavor})", root_bytes=result.root_bytes,
                       disk_bytes=result.disk_bytes, login_ok=None, serial_log=str(console_log), backend="nova",
                       ssh_ok=result.ssh_ok, checks=result.checks)


def boot_checked(store: Store, image: Path, image_sha256: str, *, firmware: str, arch: str,
                 settings: BootTestSpec, workdir: Path, state_dir: Path, kernel: Path | None,
                 suite: conformance.Suite, rebuild: bool = False) -> BootOutcome:
    """A passed boot of this image under `firmware`: from the store (keyed by the image's sha256), or
    booted now and stored."""
    key = boot_key(image_sha256, firmware, arch, settings, suite)
    with store.step(key, kind="boot", description=f"boot test {firmware} of {image.name}", rebuild=rebuild) as entry:
        if entry.cached:
            result = json.loads((entry.data / "boot.json").read_text())
            return BootOutcome(**{**result, "cached": True, "serial_log": str(entry.data / "serial.log")})
        outcome = boot_once(image, firmware=firmware, arch=arch, settings=settings, workdir=workdir,
                            accel=qemu.probe_accel(kernel, state_dir=state_dir), suite=suite)
        shutil.copyfile(outcome.serial_log, entry.data / "serial.log")
        record = {k: v for k, v in outcome.as_dict().items() if k not in ("serial_log", "cached")}
        (entry.data / "boot.json").write_text(json.dumps(record))
        # the console log the store keeps, not the build's work directory, which goes with the build
        return replace(outcome, serial_log=str(store.data(key) / "serial.log"))


def serial_log_of(workdir: Path, firmware: str) -> Path:
    """Where boot_once's QEMU writes the console of a boot under `firmware` in `workdir`."""
    return workdir / f"boot-{firmware}" / f"serial-{firmware}.log"


def console_kept(exc: BootTestError, serial: Path, kept: Path) -> BootTestError:
    """`exc`, naming `kept` instead of `serial`: a copy of that console where it outlives the scratch it is in
    (written whole into a new file renamed over `kept`, never through a link planted there)."""
    kept.parent.mkdir(parents=True, exist_ok=True)
    write_replacing(kept, serial.read_text(errors="replace"))
    return BootTestError(str(exc).replace(str(serial), str(kept)))


def run_boot_test_of_output(build: BuildRecord, *, backend: str = "qemu", firmware: list[str] | None = None,
                            timeout: int | None = None) -> list[BootOutcome]:
    """Boot the image of a finished build (read from its output directory) under each firmware, uncached."""
    if build.output is None:
        raise SpecError(f"build {build.build_id}: no output directory to boot from")
    spec = conformance.spec_of_build(build)
    images = {i.format: build.image_path(i) for i in build.images}
    image = images.get("qcow2") or next(iter(images.values()))
    if not image.exists():
        raise SpecError(f"{image}: the build's image is missing")
    settings = spec.boot_test
    if timeout:
        settings = settings.model_copy(update={"timeout": timeout})
    accel = qemu.probe_accel(None, state_dir=state_dir())
    suite = conformance.suite_of_build(build)
    outcomes: list[BootOutcome] = []
    # the boots' scratch (seed ISO, firmware variables, console) is kiln's own, never in the output directory,
    # which may be a stranger's; each console log is then written beside the images (a new file renamed over
    # the name, never through a link planted there) and the scratch goes
    scratch_root = state_dir() / "boot-scratch"
    scratch_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="kiln-boot-", dir=scratch_root))
    try:
        for fw in boot_firmware(spec, firmware):
            serial = serial_log_of(workdir, fw)
            kept = build.output / f"boot-test-qemu-{fw}-console.log"  # the build's own boot logs stay as they are
            try:
                outcome = boot_once(image, firmware=fw, arch=spec.arch.value, settings=settings, workdir=workdir,
                                    accel=accel, suite=suite)
            except BootTestError as exc:
                if not serial.is_file():
                    raise
                raise console_kept(exc, serial, kept) from None
            write_replacing(kept, Path(outcome.serial_log).read_text(errors="replace"))
            outcomes.append(replace(outcome, serial_log=str(kept)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return outcomes
