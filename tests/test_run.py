"""kiln.run: a failed command's error keeps the line that names its cause, even when it scrolled away; output a
program parses is stdout alone, while a failure's error still shows what the command said on stderr."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kiln.host import run as run_module
from kiln.host.run import TAIL_LINES, capture, output, run, terminate_all, tracked
from kiln.model.errors import CommandError


def test_a_full_disk_named_early_in_the_output_leads_the_tail() -> None:
    script = ("echo 'cp: error writing /boot/initrd.img: No space left on device'; "
              f"for i in $(seq 1 {TAIL_LINES + 10}); do echo line $i; done; exit 1")
    with pytest.raises(CommandError) as caught:
        run(["sh", "-c", script], quiet=True, what="a step")
    tail = caught.value.tail
    assert tail[0] == "(earlier) cp: error writing /boot/initrd.img: No space left on device"
    assert tail[-1] == f"line {TAIL_LINES + 10}" and len(tail) == TAIL_LINES + 1
    assert "No space left on device" in str(caught.value)


def test_without_such_a_line_the_tail_is_the_tail() -> None:
    with pytest.raises(CommandError) as caught:
        run(["sh", "-c", f"for i in $(seq 1 {TAIL_LINES + 5}); do echo line $i; done; exit 3"], quiet=True)
    assert caught.value.tail[0] == "line 6" and caught.value.returncode == 3


JSON_WITH_A_WARNING = """echo 'qemu-img: warning: the backing file is in use' >&2; echo '{"format": "qcow2"}'"""


def test_output_parses_stdout_whatever_stderr_says() -> None:
    assert json.loads(output(["sh", "-c", JSON_WITH_A_WARNING])) == {"format": "qcow2"}
    assert json.loads(capture(["sh", "-c", JSON_WITH_A_WARNING], timeout=10, what="a step")) == {"format": "qcow2"}


def test_stderr_apart_keeps_it_out_of_the_lines_but_not_out_of_reach() -> None:
    completed = run(["sh", "-c", "echo out; echo err >&2; echo out2"], quiet=True, stderr_apart=True)
    assert completed.lines == ["out", "out2"] and completed.stderr_lines == ["err"]
    merged = run(["sh", "-c", "echo out; echo err >&2"], quiet=True)
    assert sorted(merged.lines) == ["err", "out"]


@pytest.mark.parametrize("call", [output, lambda argv: capture(argv, timeout=10, what="a step")])
def test_a_failure_names_what_the_command_said_on_stderr(call: Callable[[list[str]], str]) -> None:
    script = "echo '{\"partial\": '; echo 'qemu-img: Could not open image: No such file' >&2; exit 1"
    with pytest.raises(CommandError) as caught:
        call(["sh", "-c", script])
    assert caught.value.returncode == 1
    assert caught.value.tail == ["qemu-img: Could not open image: No such file"]
    assert "Could not open image" in str(caught.value)


def test_a_failure_silent_on_stderr_shows_stdout_s_tail() -> None:
    with pytest.raises(CommandError) as caught:
        output(["sh", "-c", "echo 'Problem: the GPT is damaged'; exit 2"])
    assert caught.value.tail == ["Problem: the GPT is damaged"]


def test_a_full_disk_on_stderr_leads_the_tail_too() -> None:
    script = ("echo 'write error: No space left on device' >&2; "
              f"for i in $(seq 1 {TAIL_LINES + 10}); do echo line $i >&2; done; exit 1")
    with pytest.raises(CommandError) as caught:
        output(["sh", "-c", script])
    assert caught.value.tail[0] == "(earlier) write error: No space left on device"
    assert caught.value.tail[-1] == f"line {TAIL_LINES + 10}"


def test_much_output_on_both_streams_does_not_deadlock() -> None:
    """Neither pipe may fill up while the other is read: 1 MiB on each."""
    script = "head -c 1048576 /dev/zero | tr '\\0' e >&2 & head -c 1048576 /dev/zero | tr '\\0' o; wait"
    completed = run(["sh", "-c", script], quiet=True, stderr_apart=True, timeout=30)
    assert "".join(completed.lines) == "o" * 1048576 and "".join(completed.stderr_lines) == "e" * 1048576


def test_a_child_gets_kilns_environment_without_its_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU, mkfs, mmdebstrap … inherit kiln's environment, but not the Prefect API's credentials, cloud
    passwords or tokens (issue 15); a caller that needs one passes its environment explicitly."""
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "kiln:api-secret")
    monkeypatch.setenv("OS_PASSWORD", "cloud-secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3-secret")
    monkeypatch.setenv("DIB_DEV_USER_PASSWORD", "dib-secret")
    monkeypatch.setenv("KILN_TEST_PLAIN", "kept")
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "postgresql+asyncpg://prefect:db-secret@127.0.0.1/p")
    monkeypatch.setenv("KILN_TEST_MIRROR", "http://mirror.invalid/debian")  # a URL without credentials stays
    env = output(["env"])
    assert "KILN_TEST_PLAIN=kept" in env and "PATH=" in env and "KILN_TEST_MIRROR=http://mirror" in env
    assert not [s for s in ("api-secret", "cloud-secret", "s3-secret", "dib-secret", "db-secret") if s in env]
    assert "OS_PASSWORD=given" in output(["env"], env={"OS_PASSWORD": "given", "PATH": os.environ["PATH"]})


@pytest.mark.timeout(20)
def test_a_signal_during_a_journal_write_does_not_deadlock(tmp_path: Path) -> None:
    """Issue 15: SIGTERM arriving while the main thread writes the process journal (holding its lock) runs
    the handler, which kills the children under the same lock: it must get it, not wait for itself."""
    handled: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        terminate_all()  # what kiln's handler does first
        handled.append(signum)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        with run_module._active_lock:  # the main thread inside _journal_update
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.1)  # the handler runs here, between bytecodes, on this thread
        assert handled == [signal.SIGUSR1]
        # and a real journal write with its children still works afterwards
        with tracked(tmp_path):
            run(["true"], quiet=True)
    finally:
        signal.signal(signal.SIGUSR1, previous)
