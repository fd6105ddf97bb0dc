"""What the stage tasks share: the build context and content-key based cache keys."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect.context import TaskRunContext

from kiln.build.customize import BuildContext
from kiln.store.entries import Store


def _generation_file(store: Store, key: str) -> Path:
    return store.root / "prefect-keys" / f"{key}.gen"


def prefect_cache_key(store: Store, key: str, *, entries_valid: bool,
                      record_exists: Callable[[str], bool]) -> str:
    """The Prefect cache key for a stage whose last store entry is `key`.

    Prefect computes a task's cache key before the task runs and stores the result under it, so the key
    must be the same whether or not the store holds the stage's entries yet (the first build then leaves
    a record the second build hits). The key names the store (results hold paths into it), and a record
    under a key whose entries are gone (gc'd, corrupted) is stale: the key's generation moves past it so
    that Prefect runs the task again instead of trusting it.
    """
    gen_file = _generation_file(store, key)
    try:
        generation = int(gen_file.read_text())
    except (OSError, ValueError):
        generation = 0

    def name(gen: int) -> str:
        return f"kiln-{key}-{store.identity}-{gen}"

    if entries_valid:
        return name(generation)
    first = generation
    while record_exists(name(generation)):
        generation += 1
    if generation != first:
        gen_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = gen_file.with_name(f"{gen_file.name}.{os.getpid()}.tmp")
        tmp.write_text(str(generation))
        tmp.replace(gen_file)
    return name(generation)


def store_key(key_of: Callable[[dict[str, Any]], tuple[BuildContext, list[str]]]) -> Callable[
        [TaskRunContext, dict[str, Any]], str | None]:
    """A Prefect cache_key_fn from the stage's content keys; a cached Prefect result pointing at a
    deleted store entry is never trusted (see prefect_cache_key)."""

    def cache_key(run: TaskRunContext, parameters: dict[str, Any]) -> str | None:
        ctx, keys = key_of(parameters)
        if ctx.rebuild or not keys:
            return None

        def record_exists(name: str) -> bool:
            with contextlib.suppress(Exception):  # an unreadable result store means nothing to trust
                return bool(run.result_store.exists(name))
            return False

        return prefect_cache_key(ctx.store, keys[-1], entries_valid=all(ctx.store.valid(k) for k in keys),
                                 record_exists=record_exists)

    return cache_key
