"""QEMU's machine protocol (QMP), for the one thing the boot test asks of it: a machine reset when the
firmware stalls after the guest's own reboot.

Seen under TCG: after the conformance suite's reboot (a warm reset), OVMF prints `BdsDxe: starting Boot0001
"UEFI Misc Device"` and then nothing, for good (twice in fresh-clone test runs, with different images;
never on a first boot and never under SeaBIOS). The guest's second boot is what the suite checks, not
the firmware's warm-reset path under an emulator, so the console reader resets the machine once when
nothing has come from it for a while after the reboot (`SerialConsole`), and says so.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from kiln.model.errors import BootTestError

TIMEOUT = 10.0
MAX_REPLY = 1 << 20


def _read_reply(sock: socket.socket, deadline: float) -> dict[str, Any]:
    """The next reply that is not an event (QEMU interleaves asynchronous events with replies)."""
    buffer = b""
    while True:
        while b"\n" not in buffer:
            if time.monotonic() >= deadline or len(buffer) > MAX_REPLY:
                raise BootTestError("QMP: no reply from QEMU in time")
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                raise BootTestError("QMP: QEMU closed the connection")
            buffer += chunk
        line, buffer = buffer.split(b"\n", 1)
        message = json.loads(line)
        if isinstance(message, dict) and "event" not in message:
            return message


def execute(path: Path, command: str) -> dict[str, Any]:
    """Run one QMP command on the socket `path` (after the greeting and capabilities negotiation)."""
    deadline = time.monotonic() + TIMEOUT
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(str(path))
        greeting = _read_reply(sock, deadline)
        if "QMP" not in greeting:
            raise BootTestError(f"QMP: not a QMP greeting: {str(greeting)[:200]}")
        for name in ("qmp_capabilities", command):
            sock.sendall(json.dumps({"execute": name}).encode() + b"\n")
            reply = _read_reply(sock, deadline)
            if "error" in reply:
                raise BootTestError(f"QMP {name}: {str(reply['error'])[:200]}")
        return reply
