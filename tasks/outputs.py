"""outputs: the images, manifest.json and SHA256SUMS in the output directory."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from kiln.boot.local import BootOutcome
from kiln.build.customize import BuildContext
from kiln.image.convert import ImageOutput
from kiln.image.pack import PackOutput
from kiln.model.options import BuildOptions
from kiln.publish.manifest import (
    base_manifest,
    install_file,
    markdown_summary,
    write_checksum_files,
    write_checksums,
    write_manifest,
)
from kiln.sources.bootstrap import components
from kiln.sources.suites import origin_counts, package_origins


@task(name="outputs")
def write_outputs(ctx: BuildContext, options: BuildOptions, build_id: str, packed: PackOutput,
                  images: list[ImageOutput], boots: list[BootOutcome],
                  stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    logger = get_run_logger()
    plan = ctx.plan
    out = Path(options.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for image in images:
        dest = install_file(image.path, out / image.path.name)
        files.append({"file": dest.name, "path": str(dest), "format": image.format, "size": image.size,
                      "sha256": image.sha256, "sha512": image.sha512})
    package_list = packed.packages
    if plan.suites and packed.packages:
        package_list = package_origins(packed.packages, plan.suites, arch=plan.spec.arch.value,
                                       components=components(plan.spec.distro.value))
        logger.info("outputs: %d of %d packages from the security suite%s", sum(
            1 for p in package_list if str(p["suite"]).endswith("-security")), len(package_list),
            f" (suites left out by the spec: {', '.join(plan.suites_opted_out)})" if plan.suites_opted_out else "")
    manifest = base_manifest(build_id=build_id)
    manifest.update({
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "spec": plan.spec.model_dump(mode="json"),
        "mirror": plan.mirror,
        "elements": [{"name": e.name, "path": e.path, "sha256": e.hash, "origin": e.origin} for e in plan.elements],
        "base": ({"kind": "upstream", "key": plan.base_key, **plan.upstream.manifest()} if plan.upstream else
                 {"kind": "bootstrap", "key": plan.base_key, "distro": plan.bootstrap.distro,
                  "release": plan.bootstrap.release, "arch": plan.bootstrap.arch, "mirror": plan.bootstrap.mirror,
                  "release_digest": plan.bootstrap.release_digest,
                  "suites": [s.as_dict() for s in plan.suites], "suites_opted_out": plan.suites_opted_out}),
        "tree_key": plan.tree_key,
        "steps": [{"phase": s.phase, "name": s.name, "element": s.element, "key": s.key} for s in plan.steps],
        "disk": {"size": plan.spec.size, "root_uuid": packed.root_uuid, "esp_serial": packed.esp_serial,
                 "cmdline": packed.cmdline, "key": packed.key,
                 # what the disk boots with: GRUB for BIOS (amd64 only) and GRUB EFI on the ESP
                 "firmware": ["uefi"] if plan.spec.arch.value == "arm64" else ["bios", "uefi"]},
        "packages": package_list,
        "package_origins": origin_counts(package_list),
        "security_updates": sum(1 for p in package_list if str(p.get("suite", "")).endswith("-security")),
        "images": [{k: v for k, v in f.items() if k != "path"} for f in files],
        "timings": stages,
        "boot_test": [b.as_dict() for b in boots],
        "published": [],
    })
    summary = markdown_summary(manifest)
    write_manifest(out, manifest)
    write_checksums(out, manifest["images"])
    if options.checksum_files:
        for f in files:
            write_checksum_files(Path(str(f["path"])), sha256=str(f["sha256"]))
    for f in files:
        logger.info("image: %s", f["path"])
    logger.info("manifest: %s", out / "manifest.json")
    return {"output": str(out), "images": [f["path"] for f in files], "manifest": str(out / "manifest.json"),
            "summary": summary, "boot_test": manifest["boot_test"], "timings": stages}


@task(name="record_boot_tests")
def record_boot_tests(report: dict[str, Any], boots: list[BootOutcome]) -> dict[str, Any]:
    """Add boot results that came after the outputs were written (a boot in Nova needs the finished build)
    to manifest.json, the summary and the report."""
    out = Path(report["output"])
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["boot_test"] = [*manifest.get("boot_test", []), *(b.as_dict() for b in boots)]
    manifest["timings"] = report["timings"]
    write_manifest(out, manifest)
    return {**report, "boot_test": manifest["boot_test"], "summary": markdown_summary(manifest)}
