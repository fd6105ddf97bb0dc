"""Publishing a finished build: every target of a spec, Glance clouds staged and gated first, then promoted;
S3 after the gate. The pieces: kiln.publish.gates, .promote, .retention, .s3_builds; the spec model in
kiln.model.publishing, the build in kiln.model.record."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.cloud import glance, s3
from kiln.cloud.glance import GlanceImage
from kiln.host.progress import ProgressFactory, no_progress
from kiln.model.publishing import GateFailedError, PublishInputError, PublishSpec
from kiln.model.record import BuildRecord
from kiln.publish.gates import CandidateImage, Gate, manifest_gate, run_gate
from kiln.publish.promote import GlanceReport, StagedGlance, discard_staged, finish_glance, stage_glance
from kiln.publish.retention import retain_glance
from kiln.publish.s3_builds import S3Report, publish_s3, retain_s3

if TYPE_CHECKING:
    pass

log = logging.getLogger("kiln.publish")

# ---------------------------------------------------------------------------------------------------
# Everything a spec asks for


@dataclass
class PublishReport:
    glance: list[GlanceReport] = field(default_factory=list)
    s3: list[S3Report] = field(default_factory=list)
    gate: str = ""


def publish(build: BuildRecord, spec: PublishSpec, *, gate: Gate = manifest_gate, allow_withdrawn: bool = False,
            clouds_yaml: Path | None = None, progress: ProgressFactory = no_progress,
            in_use: Callable[[GlanceImage], bool] | None = None,
            gates: Mapping[str, Gate] | None = None) -> PublishReport:
    """Publish to every target of `spec`: every Glance cloud staged first (candidate and gate, each cloud
    with its own gate from `gates`, else `gate`), and only when every one passed, each promoted (with
    retention); a gate failing on one cloud deletes the candidates of all, so no cloud is left
    half-promoted. Then, only when the gate passed, each S3 location (upload, retention)."""

    if not spec.targets:
        raise PublishInputError("no publish targets: give --to glance:CLOUD or --to s3://BUCKET/PREFIX, or set "
                           "publish.targets in the spec")
    name = spec.name or build.name
    report = PublishReport()
    staged: list[StagedGlance] = []
    try:
        for cloud in spec.glance_clouds:
            conn = glance.connect(cloud, clouds_yaml=clouds_yaml)
            staged.append(stage_glance(conn, build, spec, gate=(gates or {}).get(cloud, gate), name=name,
                                       allow_withdrawn=allow_withdrawn, clouds_yaml=clouds_yaml, progress=progress))
    except BaseException:
        for done in staged:
            discard_staged(done)
        raise
    for done in staged:
        result = finish_glance(done, spec)
        kept = retain_glance(done.conn, name, keep=spec.keep, in_use=in_use)
        result.deleted_ids, result.kept_in_use_ids = kept.deleted, kept.kept_in_use
        report.glance.append(result)
        report.gate = report.gate or result.gate
    if spec.s3_locations:
        if not spec.glance_clouds:
            result_gate = run_gate(gate, CandidateImage(name, build, build.image(spec.disk_format)))
            if not result_gate.passed:
                raise GateFailedError(f"{name}: the build did not pass the boot gate: {result_gate.detail}")
            report.gate = result_gate.detail
        client = s3.client(endpoint_url=spec.s3_endpoint_url)
        for location in spec.s3_locations:
            s3_report = publish_s3(client, location, build, name=name, progress=progress)
            kept = retain_s3(client, location, name, keep=spec.keep)
            s3_report.deleted_builds, s3_report.kept_in_use = kept.deleted, kept.kept_in_use
            report.s3.append(s3_report)
    return report
