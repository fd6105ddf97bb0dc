from __future__ import annotations

import os
import subprocess
import sys
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


def test_gc_keeps_only_the_newest_failed_boot_consoles(tmp_path: Path) -> None:
    store = Store(tmp_path)
    folder = tmp_path / "failed-boots"
    folder.mkdir()
    for i in range(25):
        log = folder / f"build-{i:02d}-bios.log"
        log.write_text("console")
        os.utime(log, (1000 + i, 1000 + i))
    store.gc(max_size=10**12)
    assert sorted(p.name for p in folder.iterdir()) == [f"build-{i:02d}-bios.log" for i in range(5, 25)]


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


def test_a_step_builds_once_then_is_served_from_the_store(tmp_path: Path) -> None:
    """Store.step: the one lock -> check -> touch -> new entry sequence every stage uses."""
    store = Store(tmp_path / "s")
    with store.step("k1", kind="layer", description="first") as entry:
        assert not entry.cached and entry.scratch is not None and entry.data == entry.scratch / "data"
        (entry.data / "f").write_text("x")
        assert not store.has("k1")  # not committed before the block ends
    assert store.valid("k1") and (store.data("k1") / "f").read_text() == "x"
    before = (store.path("k1") / "last-use").stat().st_mtime_ns
    time.sleep(0.01)
    with store.step("k1", kind="layer", description="again") as entry:
        assert entry.cached and entry.scratch is None and (entry.data / "f").read_text() == "x"
    assert (store.path("k1") / "last-use").stat().st_mtime_ns > before  # touched: gc keeps what is used
    with store.step("k1", kind="layer", description="rebuilt", rebuild=True) as entry:
        assert not entry.cached
        (entry.data / "f").write_text("y")
    assert (store.data("k1") / "f").read_text() == "y"


def test_a_failed_step_leaves_nothing_and_the_next_builds_again(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    with pytest.raises(RuntimeError), store.step("k2", kind="disk", description="d") as entry:
        (entry.data / "half").write_text("written")
        raise RuntimeError("the hook failed")
    assert not store.has("k2") and list(store.tmp_dir.iterdir()) == []
    with store.step("k2", kind="disk", description="d") as entry:
        assert not entry.cached


def test_the_store_and_the_state_home_are_private(tmp_path: Path) -> None:
    """0700: the store holds strangers' trees (setuid binaries, device nodes), the state home the server's
    database and the HMAC key; a store made 0755 by an older kiln is tightened."""
    import stat as stat_mod

    from kiln.host.state import private_dir
    from kiln.store.entries import Store

    old = tmp_path / "old-store"
    old.mkdir(mode=0o755)
    old.chmod(0o755)
    Store(old)
    assert stat_mod.S_IMODE(old.stat().st_mode) == 0o700
    fresh = private_dir(tmp_path / "state" / "kiln")
    assert stat_mod.S_IMODE(fresh.stat().st_mode) == 0o700


HOLDER = """
import sys, time
from pathlib import Path
from kiln.store.entries import Store
store = Store(Path(sys.argv[1]))
with store.holding([sys.argv[2]]):
    print("holding", flush=True)
    sys.stdin.readline()   # until the test says so
"""


@pytest.mark.timeout(60)
def test_gc_skips_an_entry_another_build_holds_and_takes_it_once_released(tmp_path: Path) -> None:
    """Issue 15: a build holds shared locks on the layers it has mounted; gc takes entries exclusively and
    skips those in use (never waits for them), here with a real second process holding one."""
    store = Store(tmp_path / "store")
    for key in ("a" * 64, "b" * 64):
        with store.step(key, kind="layer", description=key[:1]) as entry:
            (entry.data / "blob").write_bytes(b"x" * 4096)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "store"), "a" * 64],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        start = time.monotonic()
        removed = store.gc(0)
        assert time.monotonic() - start < 5  # skipped, not waited for
        assert [e.key for e in removed] == ["b" * 64]
        assert store.valid("a" * 64) and not store.valid("b" * 64)
    finally:
        assert holder.stdin is not None
        holder.stdin.write("done\n")
        holder.stdin.close()
        holder.wait(timeout=30)
    assert [e.key for e in store.gc(0)] == ["a" * 64]
