"""Progress on a terminal: a bar for transfers of known size, and one live line for long work of unknown
length (a bootstrap, a boot until cloud-init's end). Only when stderr is a terminal: in a log file, a CI job
or a worker's run, the log lines themselves are the progress.

The live line is drawn by rich (which Prefect brings) below the log; log lines keep scrolling above it as
long as the logging handler writes to the current `sys.stderr` (kiln's CLI handler does), which rich
redirects while the line is shown.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.text import Text

log = logging.getLogger("kiln.progress")

UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")

Advance = Callable[[int], None]
Note = Callable[[str], None]
ProgressFactory = Callable[[str, int], contextlib.AbstractContextManager[Advance]]


def on_terminal() -> bool:
    return sys.stderr.isatty()


@contextlib.contextmanager
def terminal_progress(label: str, total: int) -> Iterator[Advance]:
    """A progress bar on stderr when it is a terminal; otherwise a log line every quarter."""
    if on_terminal():
        columns = (TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), TimeRemainingColumn())
        with Progress(*columns, transient=False) as bar:
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
def no_progress(label: str, total: int) -> Iterator[Advance]:
    yield lambda n: None


@contextlib.contextmanager
def activity(label: str, *, console: Console | None = None) -> Iterator[Note]:
    """While the block runs, on a terminal: `label`, the seconds so far and the latest line its work reported
    through the yielded `note` (a console line of the booting guest, a package being unpacked). Elsewhere
    `note` does nothing. `console`: where to draw (tests); default stderr, when it is a terminal."""
    if console is None and not on_terminal():
        yield lambda line: None
        return
    console = console or Console(stderr=True)
    start = time.monotonic()
    latest = [""]

    def render() -> Text:
        head = f"{label}: {time.monotonic() - start:4.0f} s  "
        room = max(0, console.width - len(head) - 1)
        return Text(head + latest[0][:room])

    def note(line: str) -> None:
        shown = UNPRINTABLE.sub("", line).strip()  # a guest's C1 controls or bidi marks stay off the terminal
        if shown:
            latest[0] = shown

    with Live(console=console, refresh_per_second=2, transient=True, get_renderable=render, redirect_stdout=False):
        yield note
