"""kiln.boot.qmp against a real QEMU (paused, no disk): the reset the console reader sends when the firmware
stalls after the guest's reboot, and what a refused command or a closed socket gives."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.boot import qmp
from kiln.model.errors import BootTestError


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[Path]:
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen(["qemu-system-x86_64", "-machine", "q35", "-m", "64", "-S", "-nodefaults",
                             "-display", "none", "-qmp", f"unix:{sock},server=on,wait=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        yield sock
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_a_reset_is_accepted_and_the_machine_answers_after(qemu: Path) -> None:
    assert qmp.execute(qemu, "system_reset") == {"return": {}}
    assert qmp.execute(qemu, "query-status")["return"]["status"] == "prelaunch"


def test_a_command_qemu_refuses_is_an_error_naming_it(qemu: Path) -> None:
    with pytest.raises(BootTestError, match="QMP no-such-command"):
        qmp.execute(qemu, "no-such-command")


def test_nothing_listening_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        qmp.execute(tmp_path / "absent.sock", "system_reset")
