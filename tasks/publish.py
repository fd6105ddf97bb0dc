"""publish: the finished build to Glance and S3, promoted only after the boot gate."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import task

from kiln.cloud import glance
from kiln.cloud.glance import ChecksumMismatchError
from kiln.cloud.s3 import S3ChecksumError
from kiln.model.publishing import PublishError, PublishSpec
from kiln.model.record import BuildRecord
from kiln.publish.core import publish
from kiln.publish.gates import GATES, choose_gates
from kiln.publish.refresh import publish_changes, record_published
from tasks.boot_test import boot_test_nova


def _transient(task: object, task_run: object, state: object) -> bool:
    """Retry what a retry can fix (a cloud API or S3 hiccup), never a verdict (gate, checksum)."""
    try:
        state.result()  # type: ignore[attr-defined]
    except (PublishError, ChecksumMismatchError, S3ChecksumError):
        return False
    except Exception:
        return True
    return False


@task(name="publish", retries=2, retry_delay_seconds=[30, 120], retry_jitter_factor=0.5,
      retry_condition_fn=_transient)
def publish_build(build: BuildRecord, spec: PublishSpec, gate: str | None = None,
                  only_changed: bool = False) -> dict[str, Any]:
    """Publish the build to `spec`'s targets; with `only_changed` (the nightly refresh), only to the targets
    whose stable image does not already have its content, with a package diff."""
    gates = choose_gates(spec, gate, has_compute=lambda cloud: glance.has_compute(glance.connect(cloud)),
                         nova_boot=boot_test_nova)
    local = GATES["manifest"]  # S3 alone: the verdict of the boot test the build recorded
    if only_changed:
        return publish_changes(build, spec, gate=local, gates=gates).as_dict()
    report = asdict(publish(build, spec, gate=local, gates=gates))
    record_published(build, spec.name or build.name)
    return {"status": "published", **report}
