"""Work directories of builds: claimed by a live process, released at the end, reclaimed when their
process died (SIGKILL, power loss) by the next kiln command or `kiln gc`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kiln.host.mounts import reclaim, remove_tree, unmount_under
from kiln.host.run import reap_journal
from kiln.store.entries import Store, _alive

OWNER = "owner.json"


def claim_workdir(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / OWNER).write_text(json.dumps({"pid": os.getpid()}))


def _owner(workdir: Path) -> int | None:
    try:
        pid = json.loads((workdir / OWNER).read_text())["pid"]
        return int(pid)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def release_workdir(workdir: Path) -> None:
    """Unmount whatever the build's journal still lists and remove its work directory."""
    reclaim(workdir)
    remove_tree(workdir)


def reclaim_dead_builds(store: Store) -> list[str]:
    """Release the work directories of builds whose process is gone; remove their temporary entries."""
    done = []
    for workdir in sorted(store.work_root.iterdir()) if store.work_root.is_dir() else []:
        pid = _owner(workdir)
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue
        if pid == os.getpid():
            continue
        killed = reap_journal(workdir)
        unmounted = reclaim(workdir) + unmount_under(workdir)
        remove_tree(workdir)
        what = [f"{len(killed)} processes killed"] if killed else []
        what += [f"{len(unmounted)} mounts"] if unmounted else []
        done.append(f"reclaimed {workdir}" + (f" ({', '.join(what)})" if what else ""))
    for tmp in store.clean_tmp(before_removing=unmount_under):
        done.append(f"removed unfinished cache entry {tmp.name}")
    return done
