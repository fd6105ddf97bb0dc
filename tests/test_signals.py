"""A signalled kiln ends even when something on its way out never returns (Prefect retrying a server that
stopped answering): the watchdog of kiln.cli exits after the grace period."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.e2e import REPO

STUBBORN = """
import signal, sys, time
from kiln.cli import main as cli
signal.signal(signal.SIGTERM, cli._on_signal)
ready = False
while True:  # like an engine that catches the interrupt and retries its API calls
    try:
        if not ready:
            ready = True
            print("ready", flush=True)
        time.sleep(60)
    except KeyboardInterrupt:
        print("interrupted, carrying on", flush=True)
"""


def test_a_process_that_swallows_the_interrupt_still_exits_after_the_grace() -> None:
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "KILN_STOP_GRACE": "1"})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        elapsed = time.monotonic() - start
    finally:
        proc.kill()
    assert "interrupted, carrying on" in out  # the interrupt was raised, and swallowed
    assert proc.returncode == 130 and 0.9 < elapsed < 10, (proc.returncode, elapsed, err)
    assert "still running 1 s after the signal" in err
