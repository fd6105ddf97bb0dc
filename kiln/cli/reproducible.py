"""`kiln build --check-reproducible`: build the spec twice without cache, each into a fresh store of its
own, and compare the two raw disks bit for bit. On a difference it says where the bytes differ, which files
of the root file system and of the EFI system partition differ and how (diffoscope on the differing files
where it is installed), and keeps both stores for a closer look.

Both builds run from the same plan inputs (spec, elements, mirror); a mirror that publishes between them
gives a different base key, which is reported as such rather than as a reproducibility bug.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from kiln.host.mounts import remove_tree
from kiln.image.compare import DiskComparison, compare_disks
from kiln.model.errors import CacheError
from kiln.model.options import BuildOptions
from kiln.model.spec import ImageSpec
from kiln.store.entries import Store
from kiln.store.gc import claim_workdir, release_workdir

DIRECTORY = "reproducible"  # under the store kiln build would use: the two builds' own stores


def register(build: argparse.ArgumentParser) -> None:
    build.add_argument("--check-reproducible", action="store_true",
                       help="build twice without cache, each into a fresh store, and compare the raw disks bit for "
                       "bit; on a difference list the files that differ (diffoscope where installed)")


def _disk_of(store: Store) -> tuple[str, Path]:
    """The (pack key, raw disk) of the one image a fresh store holds."""
    disks = [e for e in store.entries() if e.kind == "disk"]
    if len(disks) != 1:
        raise CacheError(f"{store.root}: expected one raw disk in the store, found {len(disks)}")
    return disks[0].key, store.data(disks[0].key) / "disk.raw"


def check_reproducible(spec: ImageSpec, options: BuildOptions,
                       run_build: Callable[[ImageSpec, BuildOptions], int]) -> int:
    """Build `spec` twice (no cache, no boot test, no publishing) and compare; 0 when bit-identical, 1 when
    not. The first build's outputs go to the options' output directory."""
    home = Store(Path(options.cache) if options.cache else None)
    top = home.root / DIRECTORY / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    seconds = []
    for name in ("a", "b"):
        output = options.output if name == "a" else str(top / "b-output")
        build = options.model_copy(update={"cache": str(top / name), "no_cache": True, "boot_test": False,
                                           "publish": False, "output": output, "plan_ref": None})
        start = time.monotonic()
        run_build(spec, build)
        seconds.append(time.monotonic() - start)
    (key_a, disk_a), (key_b, disk_b) = _disk_of(Store(top / "a")), _disk_of(Store(top / "b"))
    print(f"\nkiln: built {spec.name} twice without cache in {seconds[0]:.0f} s and {seconds[1]:.0f} s")
    if key_a != key_b:
        print(f"kiln: the two builds planned different trees (pack keys {key_a[:12]} and {key_b[:12]}): the "
              f"mirror published between them, or the elements changed; nothing compared. Stores kept in {top}")
        return 1
    workdir = home.work_root / f"reproducible-{os.getpid()}"
    claim_workdir(workdir)
    try:
        result: DiskComparison = compare_disks(disk_a, disk_b, workdir=workdir)
    finally:
        release_workdir(workdir)
    print(result.report())
    if result.identical:
        remove_tree(top)
        with contextlib.suppress(OSError):  # the last check's: the directory of checks goes too
            top.parent.rmdir()
        print(f"kiln: {spec.name} is reproducible: two no-cache builds gave the same raw disk (sha256 "
              f"{result.sha256_a})")
        return 0
    print(f"kiln: {spec.name} is NOT reproducible; both builds' stores are kept in {top} (remove it when done)")
    return 1
