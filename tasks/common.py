"""What the stage tasks share: the build context and content-key based cache keys."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect.context import TaskRunContext

from kiln.customize import BuildContext


def store_key(key_of: Callable[[dict[str, Any]], tuple[BuildContext, list[str]]]) -> Callable[
        [TaskRunContext, dict[str, Any]], str | None]:
    """A Prefect cache_key_fn: the stage's content key, but only while the store still holds every entry
    the stage produced (a cached Prefect result pointing at a deleted entry must not be trusted)."""

    def cache_key(_: TaskRunContext, parameters: dict[str, Any]) -> str | None:
        ctx, keys = key_of(parameters)
        if ctx.rebuild or not keys:
            return None
        if all(ctx.store.valid(k) for k in keys):
            return "kiln-" + keys[-1]
        return None

    return cache_key
