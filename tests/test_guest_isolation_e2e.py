"""A booted image cannot reach the host (issue 15): the Prefect API, the S3 server and the OpenStack services
listen on the host's loopback, which QEMU's user network offers the guest as 10.0.2.2. An element enables a
unit that tries, at every boot, to connect to a listener the test opens on 127.0.0.1; the default image with
that element is built and booted for real (SeaBIOS, both boots of the conformance suite), the guest's
attempts show on its console, and no connection arrives."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from tests.e2e import kiln, leftovers, manifest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

UNIT = """[Unit]
Description=kiln test: try to reach the build host's services
After=network-online.target
Wants=network-online.target

[Service]
Type=oneshot
ExecStart=/bin/bash -c 'for i in 1 2 3; do for host in 10.0.2.2 10.0.2.3; do \\
  echo "KILN-PHONE-HOME trying $host:{port}" > /dev/console; \\
  if timeout 3 bash -c "exec 3<>/dev/tcp/$host/{port}"; then \\
  echo "KILN-PHONE-HOME connected $host" > /dev/console; fi; done; sleep 2; done; true'

[Install]
WantedBy=multi-user.target
"""


def _phone_home_element(root: Path, port: int) -> Path:
    element = root / "kiln-test-phone-home"
    (element / "install.d").mkdir(parents=True)
    (element / "README.md").write_text("Tries to reach the build host's loopback from the guest (a test).\n")
    hook = element / "install.d" / "60-phone-home"
    hook.write_text("#!/bin/bash\nset -eu\n"
                    f"cat > /etc/systemd/system/kiln-phone-home.service <<'EOF'\n{UNIT.format(port=port)}EOF\n"
                    "systemctl enable kiln-phone-home.service\n")
    hook.chmod(0o755)
    return root


def test_a_booted_guest_cannot_connect_to_the_hosts_loopback(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    arrived: list[tuple[str, int]] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            arrived.append(peer)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        elements = _phone_home_element(tmp_path / "elements", port)
        out = tmp_path / "out"
        kiln("build", "images/debian-12.yaml", "--element", "kiln-test-phone-home", "--elements-path",
             str(elements), "--firmware", "bios", "--name", "phone-home", "--output", str(out), timeout=2300)
    finally:
        done.set()
        thread.join(timeout=5)
        listener.close()
    [boot] = manifest(out)["boot_test"]
    assert boot["passed"] and boot["cached"] is False, boot
    console = Path(boot["serial_log"]).read_text(errors="replace")
    assert f"KILN-PHONE-HOME trying 10.0.2.2:{port}" in console  # the guest did try, at the boot under test
    assert "KILN-PHONE-HOME connected" not in console
    assert arrived == [], f"the guest reached the host's loopback: {arrived}"
    assert leftovers() == []
