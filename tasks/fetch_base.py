"""fetch_base: the bootstrapped base tree (the bottom layer)."""

from __future__ import annotations

from prefect import task

from kiln.build.customize import BuildContext, StepResult, ensure_base
from kiln.model.errors import CommandError
from kiln.sources.download import DownloadError
from kiln.sources.verify import VerificationError
from tasks.common import store_key


def _retry_on_command_error(task: object, task_run: object, state: object) -> bool:
    """Retry only what a retry can fix (a mirror that failed to answer), not a bad spec."""
    try:
        state.result()  # type: ignore[attr-defined]
    except VerificationError:
        return False  # a checksum or signature mismatch is never retried (and never cached)
    except (CommandError, DownloadError):
        return True
    except Exception:
        return False
    return False


@task(name="fetch_base", retries=2, retry_delay_seconds=[10, 30], retry_jitter_factor=0.5,
      retry_condition_fn=_retry_on_command_error,
      cache_key_fn=store_key(lambda p: (p["ctx"], [p["ctx"].plan.base_key])), persist_result=True)
def fetch_base(ctx: BuildContext) -> StepResult:
    return ensure_base(ctx)
