from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kiln.sources.mirror import host_mirrors
from tests import e2e
from tests.upstream_fixtures import published, server  # noqa: F401  (fixtures of the upstream tests)

# every boot a test asserts on runs in this session: a fresh boot generation makes every boot key new (a
# second build of the same image within the session still finds its boot cached, as it should)
os.environ.setdefault("KILN_BOOT_GENERATION", f"test-session-{os.getpid()}-{os.urandom(4).hex()}")


@pytest.fixture(scope="session", autouse=True)
def session_roots(tmp_path_factory: pytest.TempPathFactory) -> None:
    """What this session's leftover checks look under, besides the test store: its own temporary tree."""
    e2e.SESSION_ROOTS[:] = [str(tmp_path_factory.getbasetemp())]


@pytest.fixture
def make_element(tmp_path: Path) -> Callable[..., Path]:
    """Create an element directory: make_element("name", deps=[...], hooks={"install.d/10-x": "script"})."""
    root = tmp_path / "elements"

    def make(name: str, *, deps: list[str] | None = None, provides: list[str] | None = None,
             hooks: dict[str, str] | None = None, files: dict[str, str] | None = None,
             executable: bool = True) -> Path:
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        if deps is not None:
            (d / "element-deps").write_text("\n".join(deps) + "\n")
        if provides is not None:
            (d / "element-provides").write_text("\n".join(provides) + "\n")
        for rel, text in (hooks or {}).items():
            p = d / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text if text.startswith("#!") else "#!/bin/bash\n" + text)
            if executable:
                p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        for rel, text in (files or {}).items():
            p = d / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
        return d

    make.root = root  # type: ignore[attr-defined]
    root.mkdir(parents=True, exist_ok=True)
    return make


@pytest.fixture
def host_env() -> dict[str, str]:
    """A host environment with a mirror, so planning does not depend on this machine's apt sources."""
    return {"DIB_DISTRIBUTION_MIRROR": "http://mirror.invalid/debian", "PATH": os.environ.get("PATH", "")}


_SERVER_BEFORE = pytest.StashKey[bool]()


def _server_file() -> Path:
    from tests.e2e import kiln_env

    return Path(kiln_env()["KILN_STATE"]) / "prefect" / "server.json"


# The suite's disk: the test stores keep layers between runs (so a machine builds the default, trixie and arm64
# images once), and a run needs room beyond them for its own builds, outputs and temporary trees. Measured on
# a whole `make test` (README, "The two commands"): the partition's free space fell by less than PEAK_USE during the
# run. Before a run the stores are trimmed to their budgets, and further (oldest entries first) while the
# partition has less than PEAK_USE free; a machine that still has too little stops the run at once, saying
# how much it needs, instead of failing forty minutes in with "No space left on device".
MAIN_STORE_BUDGET = "16G"
OTHER_STORE_BUDGET = "1G"
# during a run the main store grows by 1-1.5 GB per image variant the tests build (fault variants, refresh
# nights, private mirrors: 30 GB in a whole run, measured); after each module it is trimmed back to this
MID_RUN_BUDGET = "22G"
PEAK_USE = "30G"
SUBSET_USE = "10G"  # a run of a few end-to-end tests (fewer than FULL_RUN_SLOW_TESTS)
FULL_RUN_SLOW_TESTS = 40


def _test_store() -> Path | None:
    """The main test store, when the tests use the test store: never a store of the developer's that
    KILN_CACHE in the environment named (the suite trims only its own)."""
    from tests.e2e import kiln_env

    cache = Path(kiln_env()["KILN_CACHE"])
    ours = Path(os.environ.get("KILN_TEST_CACHE", "/var/tmp/kiln-test/cache"))
    return cache if cache == ours else None


def _trim_stores(main_budget: int) -> None:
    from kiln.model.spec import parse_size
    from kiln.store.entries import Store

    cache = _test_store()
    if cache is None:
        return
    for store_dir in [cache, *sorted(cache.parent.glob(cache.name + "-*"))]:
        if (store_dir / "entries").is_dir():
            Store(store_dir).gc(main_budget if store_dir == cache else parse_size(OTHER_STORE_BUDGET))


def _make_room(peak: str) -> None:
    """Trim the test stores to their budgets, then further while the partition has less than `peak` free."""
    from kiln.model.spec import parse_size

    cache = _test_store()
    if cache is None:
        return
    cache.mkdir(parents=True, exist_ok=True)
    need = parse_size(peak)
    _trim_stores(parse_size(MAIN_STORE_BUDGET))
    budget = parse_size(MAIN_STORE_BUDGET)
    while shutil.disk_usage(cache).free < need and budget > 0:
        budget = max(0, budget - parse_size("4G"))
        _trim_stores(budget)
    free = shutil.disk_usage(cache).free
    if free < need:
        pytest.exit(f"the test suite needs {peak} free on the partition of {cache} (its builds, images and "
                    f"temporary trees at their peak); it has {free / 1024**3:.1f} GiB even with the test stores "
                    "emptied: free some space and run it again", returncode=3)


def pytest_configure(config: pytest.Config) -> None:
    """A given --basetemp (make test's) is emptied by pytest with a plain rmtree at the start of the run: if a
    killed run left a mount below it (a chroot's bind of the host's /dev), that would delete the host's
    device nodes. Empty it first the careful way: unmount what is below, never cross a file system."""
    from kiln.host.mounts import remove_tree
    from kiln.model.errors import MountError

    basetemp = config.option.basetemp
    if not basetemp:
        return
    if Path(basetemp).exists():
        try:
            remove_tree(Path(basetemp))
        except MountError as exc:
            pytest.exit(f"cannot empty the test's temporary tree: {exc}", returncode=3)
    # pytest makes the directory itself, but not its parents (absent on a machine that never ran the suite)
    Path(basetemp).parent.mkdir(parents=True, exist_ok=True)


def pytest_sessionstart(session: pytest.Session) -> None:
    # a server already running belongs to another test run on this machine (or to the developer)
    session.config.stash[_SERVER_BEFORE] = _server_file().exists()


@pytest.fixture(scope="module", autouse=True)
def trim_the_store_after_each_module(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a module of end-to-end tests, the main test store back to MID_RUN_BUDGET (least recently used
    entries first; nothing of a running build: none runs between modules)."""
    yield
    slow = any(item.get_closest_marker("slow") for item in request.session.items
               if item.module is request.module)
    if slow and not request.config.stash.get(_SERVER_BEFORE, True):
        from kiln.model.spec import parse_size
        from kiln.store.entries import Store

        main = _test_store()
        if main is not None and (main / "entries").is_dir():
            Store(main).gc(parse_size(MID_RUN_BUDGET))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Room on the disk for what this run will build: PEAK_USE for the whole suite, SUBSET_USE for a few
    end-to-end tests, nothing for fast tests alone (they leave the stores be)."""
    slow = [item for item in session.items if item.get_closest_marker("slow")]
    if slow and not session.config.stash[_SERVER_BEFORE] and not session.config.option.collectonly:
        _make_room(PEAK_USE if len(slow) >= FULL_RUN_SLOW_TESTS else SUBSET_USE)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop the Prefect server the end-to-end tests' kiln commands started (it outlives each command by
    design, so that the next one reuses it) and trim the test stores; neither when the server was already
    running at the start: another test run may still be using both."""
    from kiln.server.prefect import stop_server
    from tests.e2e import kiln_env

    if session.config.stash.get(_SERVER_BEFORE, False) or not _server_file().exists():
        return
    stop_server(Path(kiln_env()["KILN_STATE"]))
    # the test stores grow by a few GiB per run (every fault variant is a new package layer): trim them so
    # that runs on the same machine do not fill its disk. The main store keeps MAIN_STORE_BUDGET, enough for
    # the layers of the default, trixie and arm64 builds, so that a machine builds them once (the arm64
    # package step runs emulated for 10+ minutes)
    from kiln.model.spec import parse_size

    _trim_stores(parse_size(MAIN_STORE_BUDGET))


# ----------------------------------------------------------------------- a real build, shared by the suite


@pytest.fixture(scope="session")
def seed_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], float]:
    """The seed document's example (tests/data/seed-example.yaml), built and booted under both firmwares with
    root logging in: once per session, shared by every module that needs a real image or its packages (a
    fixture imported into a module instead would be a second fixture, built a second time)."""
    out = tmp_path_factory.mktemp("seed-example")
    start = time.monotonic()
    e2e.kiln("build", "tests/data/seed-example.yaml", "--output", str(out))
    return out, e2e.manifest(out), time.monotonic() - start


@pytest.fixture(scope="session")
def seed_dib_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The seed document, transcribed to Debian: source vm_profile, then its disk-image-create line (`kiln
    dib`; booted once, SeaBIOS, root logging in on the console and over SSH). Shared by the DIB tests and
    the Nova SSH test."""
    work = tmp_path_factory.mktemp("seed-dib")
    (work / "vm_profile").write_text(
        "export DIB_RELEASE=bookworm\n"
        f"export DIB_DISTRIBUTION_MIRROR={host_mirrors()[0]}\n"
        'export DIB_CLOUD_INIT_DATASOURCES="ConfigDrive, OpenStack, NoCloud"\n')
    env = {**e2e.kiln_env(), "ELEMENTS_PATH": str(e2e.REPO / "tests/data/seed/elements"),
           "KILN_BOOT_FIRMWARE": "bios", "KILN_BOOT_ROOT_LOGIN": "1"}
    kiln_cmd = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "kiln.cli"])
    line = "dib --offline -a amd64 -o debian-bookworm-amd64 vm cloud-init-cfg debian"
    script = f"source vm_profile && {kiln_cmd} {line}"
    proc = subprocess.run(["bash", "-c", script], cwd=work, env={**env, "PYTHONPATH": str(e2e.REPO)},
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return work, e2e.manifest(work)


@pytest.fixture(scope="session")
def default_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default image built as `make image` builds it, boot test included (its stages may come from the
    test store's cache, its boots never: KILN_BOOT_GENERATION is fresh per session): an output directory as
    `kiln build -o` leaves it. One build serves both the image and its boots: a second build could find its
    pack stage evicted from the store by the modules between them and pack a different image."""
    out = tmp_path_factory.mktemp("default-build") / "output"
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "build", "images/debian-12.yaml", "-o", str(out)],
                          cwd=e2e.REPO, env=e2e.kiln_env(), capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, f"kiln build failed\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return out


@pytest.fixture(scope="session")
def default_boots(default_build: Path) -> dict[str, dict[str, Any]]:
    """The default image's boots in this session, once per firmware of its spec (SeaBIOS, OVMF, OVMF with
    Secure Boot): firmware -> the manifest's boot_test entry, with the conformance checks."""
    return {b["firmware"]: b for b in e2e.manifest(default_build)["boot_test"]}


@pytest.fixture(scope="session")
def default_raw(default_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default image as a raw disk (a sparse copy converted from its qcow2)."""
    raw = tmp_path_factory.mktemp("default-raw") / "debian-12-amd64.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(default_build / "debian-12-amd64.qcow2"), str(raw)],
                   check=True)
    return raw


def _root_offset(raw: Path) -> int:
    out = subprocess.run(["sgdisk", "-i", "1", str(raw)], capture_output=True, text=True, check=True).stdout
    first = next(line for line in out.splitlines() if line.startswith("First sector"))
    return int(first.split(":")[1].split()[0]) * 512


@pytest.fixture(scope="session")
def default_tree(default_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The default image's root file system as a plain directory tree (copied out of a read-only loop mount,
    which is gone before the tree is used)."""
    base = tmp_path_factory.mktemp("default-tree")
    mnt, tree = base / "mnt", base / "tree"
    mnt.mkdir()
    subprocess.run(["mount", "-o", f"ro,loop,nosuid,nodev,offset={_root_offset(default_raw)}", str(default_raw),
                    str(mnt)], check=True)
    try:
        subprocess.run(["cp", "-a", f"{mnt}/.", str(tree)], check=True)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    yield tree


@pytest.fixture(scope="session")
def default_kernel(default_tree: Path) -> Path:
    """The default image's kernel (vmlinuz), as a file."""
    [kernel] = sorted((default_tree / "boot").glob("vmlinuz-*"))
    return kernel
