"""The guest network's data plane of kiln's single-node OpenStack: the stack's L2 agent, in a few lines.

Nova plugs a port of the guest network (bound by the `kiln_tap` ML2 driver) as a tap device on this
host, `tap` + the port id's first 11 characters, and QEMU attaches the guest's NIC to it. This daemon
moves each such tap, once QEMU holds it (carrier up), into the network namespace NETNS, onto a bridge
there that carries the subnet's gateway address. So the guests reach each other and that address, and
nothing else: the namespace has no route out and no interface of the host's, and nothing on the host
ever sees a packet of theirs. From the host, a guest is reached through that namespace (kiln's Nova
boot test runs its SSH client there: clouds.yaml `kiln.ssh_netns`).

A tap in the namespace whose QEMU has gone (no carrier) is deleted, so that a hard reboot's new tap of
the same name can take its place. The namespace goes with `down.sh` (component `guestnet`).

    guestnet.py --netns kiln-guests --gateway 10.254.213.1/24 --network kiln-guests
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import openstack

BRIDGE = "br-guests"
POLL = 0.5


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def links(netns: str | None = None) -> list[dict[str, Any]]:
    return list(json.loads(ip("-j", "link", "show", netns=netns) or "[]"))


def ensure_netns(netns: str, gateway: str) -> None:
    if not os.path.exists(f"/run/netns/{netns}"):
        ip("netns", "add", netns)
        log(f"made network namespace {netns}")
    names = {link["ifname"] for link in links(netns)}
    ip("link", "set", "lo", "up", netns=netns)
    if BRIDGE not in names:
        ip("link", "add", BRIDGE, "type", "bridge", netns=netns)
    if gateway not in ip("-br", "addr", "show", "dev", BRIDGE, netns=netns):
        ip("addr", "replace", gateway, "dev", BRIDGE, netns=netns)
    ip("link", "set", BRIDGE, "up", netns=netns)


def log(message: str) -> None:
    print(f"guestnet: {message}", flush=True)


def connect() -> Any:
    return openstack.connect(
        auth_url=os.environ["KILN_KEYSTONE_URL"], username="neutron",
        password=os.environ["KILN_NEUTRON_SERVICE_PASSWORD"], project_name="service",
        user_domain_name="Default", project_domain_name="Default", region_name=os.environ.get("KILN_REGION"),
    )


class PortNames:
    """The tap names of the guest network's ports, looked up again when an unknown tap shows up."""

    def __init__(self, network: str) -> None:
        self.network = network
        self.conn: Any = None
        self.names: set[str] = set()
        self.looked = 0.0

    def refresh(self) -> None:
        try:
            if self.conn is None:
                self.conn = connect()
            net = self.conn.network.find_network(self.network, ignore_missing=True)
            ports = list(self.conn.network.ports(network_id=net.id)) if net is not None else []
        except Exception as exc:  # Neutron restarting: try again at the next poll
            log(f"could not list the ports of {self.network}: {exc}")
            self.conn = None
            return
        self.names = {("tap" + str(p.id))[:14] for p in ports}

    def __contains__(self, tap: str) -> bool:
        # a tap of something else on this host (never moved): Neutron asked about it every 2 s at most
        if tap not in self.names and time.monotonic() - self.looked > 2:
            self.looked = time.monotonic()
            self.refresh()
        return tap in self.names


def step(netns: str, ports: PortNames) -> None:
    for link in links(netns):
        if link["ifname"].startswith("tap") and "LOWER_UP" not in link.get("flags", []):
            ip("link", "del", link["ifname"], netns=netns, check=False)
            log(f"deleted {link['ifname']}: its guest is gone")
    for link in links():
        name = str(link["ifname"])
        if not name.startswith("tap") or "LOWER_UP" not in link.get("flags", []) or name not in ports:
            continue
        ip("link", "set", name, "netns", netns)
        ip("link", "set", name, "master", BRIDGE, "up", netns=netns)
        log(f"moved {name} ({link.get('address', '?')}) into {netns}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--netns", required=True)
    p.add_argument("--gateway", required=True, help="the bridge's address in the namespace, CIDR")
    p.add_argument("--network", required=True, help="the Neutron network whose taps belong here")
    args = p.parse_args()
    running = True

    def stop(*_: Any) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    ensure_netns(args.netns, args.gateway)
    log(f"ready: taps of network {args.network} go into {args.netns} ({args.gateway} on {BRIDGE})")
    ports = PortNames(args.network)
    while running:
        try:
            step(args.netns, ports)
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
            log(f"error: {exc}")
        time.sleep(POLL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
