from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from kiln.store.entries import Store


def test_entry_appears_only_when_complete(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with store.lock("k1"), store.new_entry("k1", kind="layer", description="d") as tmp:
        (tmp / "data" / "f").write_text("x")
        assert not store.has("k1")
    assert store.has("k1")
    assert (store.data("k1") / "f").read_text() == "x"


def test_failed_build_leaves_no_entry(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(RuntimeError), store.lock("k2"), store.new_entry("k2", kind="layer", description="d") as tmp:
        (tmp / "data" / "f").write_text("half")
        raise RuntimeError("killed")
    assert not store.has("k2")
    assert list(store.tmp_dir.iterdir()) == []


def test_stale_tmp_of_dead_process_is_cleaned(tmp_path: Path) -> None:
    store = Store(tmp_path)
    stale = store.tmp_dir / "abc.999999999.deadbeef"
    (stale / "data").mkdir(parents=True)
    assert store.clean_tmp() == [stale]
    assert not stale.exists()


def test_gc_removes_least_recently_used(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for i, key in enumerate(["old", "mid", "new"]):
        with store.lock(key), store.new_entry(key, kind="layer", description=key) as tmp:
            (tmp / "data" / "blob").write_bytes(b"x" * 100_000)
        t = time.time() - 100 + i * 10
        import os

        os.utime(store.path(key) / "last-use", (t, t))
    removed = store.gc(max_size=250_000)
    assert [e.key for e in removed] == ["old"]
    assert store.has("mid") and store.has("new")


def test_concurrent_builders_of_one_key_build_once(tmp_path: Path) -> None:
    store = Store(tmp_path)
    built = []

    def build() -> None:
        with store.lock("same"):
            if store.has("same"):
                return
            with store.new_entry("same", kind="layer", description="d") as tmp:
                time.sleep(0.2)
                (tmp / "data" / "f").write_text(str(threading.get_ident()))
                built.append(1)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert built == [1]
    assert len(store.entries()) == 1
