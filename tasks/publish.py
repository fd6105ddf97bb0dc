"""publish: the finished build to Glance and S3, promoted only after the boot gate."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import task

from kiln.glance import ChecksumMismatchError
from kiln.publish import GATES, PublishError, PublishSpec, load_build, publish
from kiln.s3 import S3ChecksumError


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
def publish_build(output: str, spec: PublishSpec, gate: str = "manifest") -> dict[str, Any]:
    return asdict(publish(load_build(Path(output)), spec, gate=GATES[gate]))
