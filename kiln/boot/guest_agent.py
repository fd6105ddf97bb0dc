"""The QEMU guest agent, from the host: a `guest-ping` over the agent's virtio-serial channel.

The channel is a unix socket QEMU serves (`-chardev socket,…` with a `virtserialport` named
org.qemu.guest_agent.0). The guest is untrusted: every read is bounded in size and time.
"""

from __future__ import annotations

import functools
import json
import operator
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PORT_NAME = "org.qemu.guest_agent.0"
_MAX_READ = 64 * 1024


def _answer(sock: socket.socket, wanted: Callable[[Any], bool], seconds: float) -> bool:
    """Read JSON lines until one `{"return": X}` with wanted(X); False on timeout, EOF or too much."""
    until = time.monotonic() + seconds
    buf = b""
    total = 0
    while time.monotonic() < until:
        sock.settimeout(max(0.1, until - time.monotonic()))
        try:
            data = sock.recv(4096)
        except TimeoutError:
            return False
        if not data:
            return False
        total += len(data)
        if total > _MAX_READ:
            return False
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            try:
                reply = json.loads(line.strip(b"\xff \r\t"))
            except ValueError:
                continue
            if isinstance(reply, dict) and "return" in reply and wanted(reply["return"]):
                return True
    return False


def ping(path: Path, *, deadline: float, stop: threading.Event | None = None) -> str:
    """Ask the agent at `path` for guest-sync then guest-ping until `deadline`: "" when it answered, else
    what went wrong (for the check's detail)."""
    last = "no answer"
    while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
        sync = secrets.randbelow(2**31)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(path))
                sock.sendall(json.dumps({"execute": "guest-sync", "arguments": {"id": sync}}).encode() + b"\n")
                wait = min(10.0, max(0.1, deadline - time.monotonic()))
                if not _answer(sock, functools.partial(operator.eq, sync), wait):
                    last = "guest-sync got no answer"
                else:
                    sock.sendall(b'{"execute": "guest-ping"}\n')
                    if _answer(sock, lambda r: r == {}, 10.0):
                        return ""
                    last = "guest-sync answered, guest-ping did not"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(1)
    return f"the guest agent did not answer guest-ping ({last})"
