"""publish: the finished build to Glance and S3, promoted only after the boot gate."""

from __future__ import annotations

from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from prefect import task

from kiln.cloud import glance
from kiln.cloud.glance import ChecksumMismatchError
from kiln.cloud.s3 import S3ChecksumError
from kiln.publish.core import GATES, Gate, PublishError, PublishSpec, load_build, nova_gate, publish
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


def choose_gates(spec: PublishSpec, gate: str | None = None) -> dict[str, Gate]:
    """The gate of each Glance cloud: `gate` when the build says (its boot test is the candidate's Nova
    boot), else Nova for a cloud with a compute endpoint (it boots the candidate the way it boots every
    image) and the verdict of kiln's local boot test recorded in the manifest for one without."""
    chosen = {}
    for cloud in spec.glance_clouds:
        name = gate or ("nova" if glance.has_compute(glance.connect(cloud)) else "manifest")
        chosen[cloud] = gate_for(name)
    return chosen


@task(name="publish", retries=2, retry_delay_seconds=[30, 120], retry_jitter_factor=0.5,
      retry_condition_fn=_transient)
def publish_build(output: str, spec: PublishSpec, gate: str | None = None,
                  only_changed: bool = False) -> dict[str, Any]:
    """Publish the build in `output` to `spec`'s targets; with `only_changed` (the nightly refresh), only
    to the targets whose stable image does not already have its content, with a package diff."""
    build = load_build(Path(output))
    gates = choose_gates(spec, gate)
    local = GATES["manifest"]  # S3 alone: the verdict of the boot test the build recorded
    if only_changed:
        return publish_changes(build, spec, gate=local, gates=gates).as_dict()
    report = asdict(publish(build, spec, gate=local, gates=gates))
    record_published(build, spec.name or build.name)
    return {"status": "published", **report}


def gate_for(name: str) -> Gate:
    """The gate called `name`; the Nova boot runs as the boot_test_nova task, a stage of the flow of its own."""
    return partial(nova_gate, boot=boot_test_nova) if name == "nova" else GATES[name]
