"""The Prefect cache key of a stage: stable across the first and second build, never trusting a record
whose store entries are gone."""

from __future__ import annotations

from pathlib import Path

from kiln.store import Store
from tasks.common import prefect_cache_key


def test_the_key_is_the_same_before_and_after_the_entries_exist(tmp_path: Path) -> None:
    store = Store(tmp_path)
    records: set[str] = set()
    first = prefect_cache_key(store, "abc", entries_valid=False, record_exists=records.__contains__)
    records.add(first)  # the first build's task ran and Prefect stored its result under `first`
    second = prefect_cache_key(store, "abc", entries_valid=True, record_exists=records.__contains__)
    assert second == first


def test_a_record_whose_entries_are_gone_is_not_used_again(tmp_path: Path) -> None:
    store = Store(tmp_path)
    records: set[str] = set()
    first = prefect_cache_key(store, "abc", entries_valid=False, record_exists=records.__contains__)
    records.add(first)
    after_gc = prefect_cache_key(store, "abc", entries_valid=False, record_exists=records.__contains__)
    assert after_gc != first and after_gc not in records
    records.add(after_gc)
    # the rebuilt entries are valid again: the new record is hit from now on, in a new process too
    assert prefect_cache_key(Store(tmp_path), "abc", entries_valid=True,
                             record_exists=records.__contains__) == after_gc


def test_keys_of_different_stages_differ(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert (prefect_cache_key(store, "a", entries_valid=True, record_exists=lambda _: False)
            != prefect_cache_key(store, "b", entries_valid=True, record_exists=lambda _: False))
