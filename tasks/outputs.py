"""outputs: the images, manifest.json, the SBOMs and SHA256SUMS (signed) in the output directory."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.runtime import flow_run

from kiln import __version__
from kiln.build.customize import BuildContext
from kiln.host.checksums import write_replacing
from kiln.image.convert import ImageOutput
from kiln.image.pack import PackOutput
from kiln.model.facts import SECURE_BOOT, firmware_of, is_security_suite
from kiln.model.options import BuildOptions
from kiln.model.record import BootOutcome, BuildRecord, DiskRecord, ElementRecord, ImageRecord, StageRecord, StepRecord
from kiln.model.urls import scrubbed, without_credentials
from kiln.publish import signing
from kiln.publish.manifest import install_file, signature_record, write_checksum_files, write_record
from kiln.publish.refresh import manifest_diff
from kiln.publish.sbom import ImageFacts, write_sboms
from kiln.sources.bootstrap import components
from kiln.sources.suites import origin_counts, package_origins


@task(name="outputs", task_run_name="outputs")
def write_outputs(ctx: BuildContext, options: BuildOptions, build_id: str, packed: PackOutput,
                  images: list[ImageOutput], boots: list[BootOutcome],
                  stages: dict[str, dict[str, Any]]) -> BuildRecord:
    logger = get_run_logger()
    plan = ctx.plan
    out = Path(options.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    files = [install_file(image.path, out / image.path.name) for image in images]
    package_list = packed.packages
    if plan.suites and packed.packages:
        package_list = package_origins(packed.packages, plan.suites, arch=plan.spec.arch.value,
                                       components=components(plan.spec.distro.value))
        logger.info("%d of %d packages from the security suite%s", sum(
            1 for p in package_list if is_security_suite(str(p["suite"]))), len(package_list),
            f" (suites left out by the spec: {', '.join(plan.suites_opted_out)})" if plan.suites_opted_out else "")
    record = BuildRecord(
        kiln_version=__version__, build_id=build_id, created=datetime.now(UTC).isoformat(timespec="seconds"),
        # no URL's credentials in the record: it is published (S3, Glance properties)
        spec=scrubbed(plan.spec.model_dump(mode="json")), mirror=without_credentials(plan.mirror),
        elements=[ElementRecord(name=e.name, path=e.path, sha256=e.hash, origin=e.origin) for e in plan.elements],
        base=scrubbed({"kind": "upstream", "key": plan.base_key, **plan.upstream.manifest()} if plan.upstream else
                      {"kind": "bootstrap", "key": plan.base_key, "distro": plan.bootstrap.distro,
                       "release": plan.bootstrap.release, "arch": plan.bootstrap.arch,
                       "mirror": plan.bootstrap.mirror, "release_digest": plan.bootstrap.release_digest,
                       "suites": [s.as_dict() for s in plan.suites], "suites_opted_out": plan.suites_opted_out}),
        tree_key=plan.tree_key,
        steps=[StepRecord(phase=s.phase, name=s.name, element=s.element, key=s.key) for s in plan.steps],
        disk=DiskRecord(size=plan.spec.size, root_uuid=packed.root_uuid, esp_serial=packed.esp_serial,
                        cmdline=packed.cmdline, key=packed.key,
                        # what the disk boots with: GRUB for BIOS (amd64 only) and GRUB EFI on the ESP
                        firmware=[*firmware_of(plan.spec.arch.value), *([SECURE_BOOT] if packed.secure_boot else [])]),
        packages=package_list, package_origins=origin_counts(package_list),
        security_updates=sum(1 for p in package_list if is_security_suite(str(p.get("suite", "")))),
        images=[ImageRecord(file=f.name, format=i.format, size=i.size, sha256=i.sha256, sha512=i.sha512)
                for f, i in zip(files, images, strict=True)],
        space=packed.space,
        timings={name: StageRecord(**t) for name, t in stages.items()},
        boot_test=[_console_beside_images(b, out) for b in boots], output=out, run_url=_run_url(),
    )
    _attest(record, logger)
    write_record(record, seal=True)
    if options.checksum_files:
        for f, i in zip(files, images, strict=True):
            write_checksum_files(f, sha256=i.sha256)
    for f in files:
        logger.info("image %s", f)
    logger.info("manifest %s", out / "manifest.json")
    return record


def _attest(record: BuildRecord, logger: Any) -> None:
    """The SBOMs beside the images, and the key SHA256SUMS will be signed with (write_record signs it)."""
    assert record.output is not None
    spec = record.spec
    facts = ImageFacts(name=record.name, distro=str(spec["distro"]), release=str(spec["release"]),
                       build_id=record.build_id, created=record.created, image_sha256=record.images[0].sha256,
                       kiln_version=record.kiln_version)
    record.sboms = write_sboms(record.output, record.packages, facts)
    key = signing.signer()
    record.signature = signature_record(key)
    logger.info("SBOMs %s (%d packages)", ", ".join(s.file for s in record.sboms), len(record.packages))
    if key.development:
        logger.warning("SHA256SUMS signed with %s: for development only; set %s (and %s) to sign with your own key",
                       key.what, signing.SIGNING_KEY_ENV, signing.GNUPGHOME_ENV)
    else:
        logger.info("SHA256SUMS signed with %s", key.what)


def _console_beside_images(boot: BootOutcome, out: Path) -> BootOutcome:
    """The boot's serial console log copied beside the images (the store's copy goes with `kiln cache gc`)."""
    source = Path(boot.serial_log) if boot.serial_log else None
    if source is None or not source.is_file() or source.parent.resolve() == out.resolve():
        return boot
    kept = out / f"boot-{boot.backend}-{boot.firmware}-console.log"
    write_replacing(kept, source.read_text(errors="replace"))
    return replace(boot, serial_log=str(kept))


def _run_url() -> str | None:
    """The flow run's page in the Prefect UI."""
    with contextlib.suppress(Exception):  # no UI configured, or not inside a flow run
        url = flow_run.ui_url
        return str(url) if url else None
    return None


@task(name="record_boot_tests", task_run_name="record boot tests")
def record_boot_tests(record: BuildRecord, boots: list[BootOutcome], stages: dict[str, dict[str, Any]]) -> BuildRecord:
    """Add boot results that came after the outputs were written (a boot in Nova needs the finished build)."""
    assert record.output is not None
    boots = [_console_beside_images(b, record.output) for b in boots]
    record = record.model_copy(update={"boot_test": [*record.boot_test, *boots],
                                       "timings": {n: StageRecord(**t) for n, t in stages.items()}})
    write_record(record)
    return record


@task(name="record_published", task_run_name="record published")
def record_published(record: BuildRecord, report: dict[str, Any]) -> BuildRecord:
    """Add where the build was published to its record and manifest.json."""
    record = record.model_copy(update={"published": [*record.published, report],
                                       "diff": manifest_diff(report) or record.diff})
    write_record(record)
    return record
