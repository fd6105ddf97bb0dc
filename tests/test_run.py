"""kiln.run: a failed command's error keeps the line that names its cause, even when it scrolled away."""

from __future__ import annotations

import pytest

from kiln.host.run import TAIL_LINES, run
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
