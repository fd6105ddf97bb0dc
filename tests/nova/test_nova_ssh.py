"""The seed document's point, in the real Nova (issue 18): the image the seed's line builds (`kiln dib … vm
cloud-init-cfg debian`) boots in Nova with root's password in the config drive's user-data, and `ssh
root@<the server's address>` with that password runs a command as root.

The server is on the stack's guest network (infra/openstack: Neutron's flat network `kiln-guests`, its
ports bound as tap devices by the `kiln_tap` ML2 driver, each tap carried by the `guestnet` daemon into the
network namespace `kiln-guests`). The SSH client runs in that namespace; the host's own network never
holds a guest's link, which is checked while the guest runs, and the namespace reaches nothing of the host.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kiln.boot import nova
from kiln.model.record import BuildRecord
from tests.nova.conftest import SKIP_REASON, NovaStack, nova_enabled

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800), pytest.mark.skipif(not nova_enabled(), reason=SKIP_REASON)]

NETNS = "kiln-guests"


def link_names(netns: str | None = None) -> set[str]:
    argv = ["ip", *(["-n", netns] if netns else []), "-j", "link", "show"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout
    return {str(link["ifname"]) for link in json.loads(out)}


def test_the_seed_image_lets_root_in_over_ssh_in_nova(nova_stack: NovaStack, nova_conn: Any,
                                                       seed_dib_build: tuple[Path, dict[str, Any]],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    work, manifest = seed_dib_build
    assert manifest["spec"]["boot_test"]["ssh_login"] is True
    seen: dict[str, Any] = {}
    real_address = nova.server_address

    def address_spy(conn: Any, server_id: str) -> str:
        """While the guest runs: its port's tap is in the guest namespace, an isolated port of its bridge,
        and not on the host, where every tap* is dropped anyway."""
        [port] = list(conn.network.ports(device_id=server_id))
        tap = ("tap" + str(port.id))[:14]
        detail = subprocess.run(["ip", "-n", NETNS, "-d", "-j", "link", "show", "dev", tap], capture_output=True,
                                text=True, timeout=30).stdout
        seen.update(tap=tap, host=link_names(), guests=link_names(NETNS),
                    port=json.loads(detail or "[{}]")[0].get("linkinfo", {}).get("info_slave_data", {}),
                    rules=subprocess.run(["nft", "list", "table", "inet", "kiln_guests"], capture_output=True,
                                         text=True, timeout=30).stdout)
        return real_address(conn, server_id)

    monkeypatch.setattr(nova, "server_address", address_spy)
    result = nova.boot_test_output(BuildRecord.load(work), cloud=nova_stack.cloud, clouds_yaml=nova_stack.clouds_yaml)

    assert result.passed and result.ssh_ok is True, result
    assert result.network == "kiln-guests" and result.address and result.address.startswith("10.254.213."), result
    assert seen["tap"] in seen["guests"] and seen["tap"] not in seen["host"], seen
    assert seen["port"].get("isolated") is True, seen["port"]
    assert 'iifname "tap*" drop' in seen["rules"], seen["rules"]
    # the conformance suite ran at both boots (the second after a reboot through Nova's API)
    assert result.checks and not [c for c in result.checks if c.result == "fail"], result.checks
    assert nova_conn.compute.find_server(result.server_id, ignore_missing=True) is None
    assert nova.leftover_servers(nova_conn) == []
    # its QEMU gone, guestnet deletes the tap from the namespace (else a new server's tap could not move in)
    deadline = time.monotonic() + 20
    while seen["tap"] in link_names(NETNS) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert seen["tap"] not in link_names(NETNS) | link_names()


def test_the_guest_network_reaches_nothing_of_the_host(nova_stack: NovaStack) -> None:
    """What a guest's packets meet: the namespace's bridge and gateway address, no route out. A listener on
    all of the host's addresses (IPv4 and IPv6) answers the same probe run on the host, and nothing of it is
    reachable from the namespace, on any of them."""
    with socket.socket(socket.AF_INET6) as listener:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 and IPv6, every address
        listener.bind(("::", 0))
        listener.listen(16)
        listener.settimeout(1)
        port = listener.getsockname()[1]
        accepted: list[object] = []
        done_listening = threading.Event()

        def accept() -> None:
            while not done_listening.is_set():
                with contextlib.suppress(OSError):
                    conn, peer = listener.accept()
                    accepted.append(peer)
                    conn.close()

        waiter = threading.Thread(target=accept, daemon=True)
        waiter.start()
        out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True).stdout
        host_addresses = [a["local"] for link in json.loads(out) for a in link.get("addr_info", [])
                          if a.get("scope") != "link"]
        assert "127.0.0.1" in host_addresses

        def probe(*prefix: str) -> str:
            script = "; ".join(f"timeout 3 bash -c 'exec 3<>/dev/tcp/{a}/{port}' 2>/dev/null && echo reached {a} "
                               f"|| echo not {a}" for a in host_addresses)
            return subprocess.run([*prefix, "bash", "-c", script], capture_output=True, text=True, timeout=120,
                                  check=True).stdout

        on_host = probe()  # the control: the probe does reach the listener, on every address, from the host
        time.sleep(0.5)
        reached_from_host = len(accepted)
        in_netns = probe("nsenter", f"--net=/run/netns/{NETNS}", "--")
        time.sleep(0.5)
        done_listening.set()
        waiter.join(timeout=20)
    routes = subprocess.run(["ip", "-n", NETNS, "-4", "route", "show"], capture_output=True, text=True,
                            check=True).stdout
    assert on_host.count("reached ") == len(host_addresses) == reached_from_host, (on_host, accepted)
    assert "reached" not in in_netns and in_netns.count("not ") == len(host_addresses), in_netns
    assert len(accepted) == reached_from_host, accepted
    assert [line.split()[0] for line in routes.splitlines()] == ["10.254.213.0/24"], routes
    assert {n for n in link_names(NETNS) if not n.startswith("tap")} == {"lo", "br-guests"}
