"""kiln.run: a failed command's error keeps the line that names its cause, even when it scrolled away; output a
program parses is stdout alone, while a failure's error still shows what the command said on stderr."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from kiln.host.run import TAIL_LINES, capture, output, run
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
