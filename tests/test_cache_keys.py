"""The Prefect cache key of a stage: stable across the first and second build, never trusting a record
whose store entries are gone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kiln.store.entries import Store
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


def test_two_stores_never_share_a_record(tmp_path: Path) -> None:
    """Prefect's result storage is shared by every store on the machine; results hold paths into one."""
    records: set[str] = set()
    a, b, c = Store(tmp_path / "a"), Store(tmp_path / "b"), Store(tmp_path / "c")
    for store in (a, b):
        records.add(prefect_cache_key(store, "k", entries_valid=False, record_exists=records.__contains__))
    # a third, fresh store: no record of another store is taken for its own
    assert prefect_cache_key(c, "k", entries_valid=False, record_exists=records.__contains__) not in records
    assert Store(tmp_path / "a").identity == a.identity != b.identity


def test_a_generation_skips_every_stale_record(tmp_path: Path) -> None:
    store = Store(tmp_path)
    records: set[str] = set()
    for _ in range(3):  # built, gc'd, built again, gc'd ...
        records.add(prefect_cache_key(store, "k", entries_valid=False, record_exists=records.__contains__))
    assert len(records) == 3


def test_the_store_id_being_written_is_not_taken_for_an_abandoned_entry(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path)
    seen: list[list[Path]] = []
    real_link = os.link

    def link_after_a_gc(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append(Store(tmp_path).clean_tmp())  # another kiln's gc runs while the id is being written
        real_link(src, dst)

    monkeypatch.setattr("kiln.store.entries.os.link", link_after_a_gc)
    assert len(store.identity) == 16
    assert seen == [[]] and list(store.tmp_dir.iterdir()) == []
