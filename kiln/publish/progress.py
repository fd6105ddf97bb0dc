"""Progress of uploads on a terminal."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

log = logging.getLogger("kiln.publish")

# ---------------------------------------------------------------------------------------------------
# Progress on a terminal

Advance = Callable[[int], None]
ProgressFactory = Callable[[str, int], contextlib.AbstractContextManager[Advance]]


@contextlib.contextmanager
def terminal_progress(label: str, total: int) -> Iterator[Advance]:
    """A progress bar on stderr when it is a terminal; otherwise a log line every quarter."""
    if sys.stderr.isatty():
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      TimeRemainingColumn(), transient=False) as bar:
            task = bar.add_task(label, total=total)
            yield lambda n: bar.advance(task, n)
        return
    done = [0, 0]

    def advance(n: int) -> None:
        done[0] += n
        quarter = done[0] * 4 // max(total, 1)
        if quarter > done[1]:
            done[1] = quarter
            log.info("%s: %d%% of %.0f MiB", label, min(100, quarter * 25), total / (1 << 20))

    yield advance


@contextlib.contextmanager
def _no_progress(label: str, total: int) -> Iterator[Advance]:
    yield lambda n: None


