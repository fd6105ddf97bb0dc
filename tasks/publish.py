"""publish: the finished build to Glance and S3, promoted only after the boot gate."""

from __future__ import annotations

from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from prefect import task

from kiln.glance import ChecksumMismatchError
from kiln.publish import GATES, Gate, PublishError, PublishSpec, load_build, nova_gate, publish
from kiln.s3 import S3ChecksumError
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


def choose_gate(spec: PublishSpec) -> str:
    """Nova when a Glance target's cloud has a compute endpoint (the cloud boots the candidate the way it
    boots every image), else the verdict of kiln's local boot test recorded in the manifest."""
    from kiln import glance

    for cloud in spec.glance_clouds:
        if glance.has_compute(glance.connect(cloud)):
            return "nova"
    return "manifest"


@task(name="publish", retries=2, retry_delay_seconds=[30, 120], retry_jitter_factor=0.5,
      retry_condition_fn=_transient)
def publish_build(output: str, spec: PublishSpec, gate: str | None = None) -> dict[str, Any]:
    return asdict(publish(load_build(Path(output)), spec, gate=gate_for(gate or choose_gate(spec))))


def gate_for(name: str) -> Gate:
    """The gate called `name`; the Nova boot runs as the boot_test_nova task, a stage of the flow of its own."""
    return partial(nova_gate, boot=boot_test_nova) if name == "nova" else GATES[name]
