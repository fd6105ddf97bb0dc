"""The guest network's data plane of kiln's single-node OpenStack: the stack's L2 agent, in a few lines.

Nova plugs a port of the guest network (bound by the `kiln_tap` ML2 driver) as a tap device on this
host, `tap` + the port id's first 11 characters, and QEMU attaches the guest's NIC to it. This daemon
moves each such tap, once QEMU holds it (carrier up), into the network namespace NETNS, onto a bridge
there that carries the subnet's gateway address, as an isolated bridge port (guests do not reach each
other). So a guest reaches that address and nothing else: the namespace has no route out, no interface
of the host's, forwarding off and nothing listening. From the host, a guest is reached only through that
namespace (kiln's Nova boot test runs its SSH client there: clouds.yaml `kiln.ssh_netns`).

Until a tap is moved (from Nova's `ip tuntap add` until the next poll after QEMU opened it) it is a link
of the host's: the nftables tables `inet kiln_guests` and `arp kiln_guests`, made before anything else,
drop every packet and ARP request from and to any `tap*` device of the host's namespace, so the host's
services never see one. The tables stay if this daemon dies (fail closed); `down.sh` removes them with
the namespace.

A tap in the namespace whose QEMU has gone (up, no carrier) is deleted, so that a hard reboot's new tap
of the same name can take its place; a tap left there without its bridge (a move cut short) is put on it.

    guestnet.py --netns kiln-guests --gateway 10.254.213.1/24 --physnet kiln-guests
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
TABLE = "kiln_guests"
POLL = 0.5
# the host's side: nothing from or to a tap device (a guest's link before it is moved)
RULES = f"""
table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
    chain input {{ type filter hook input priority raw; policy accept; iifname "tap*" drop; }}
    chain forward {{ type filter hook forward priority raw; policy accept; iifname "tap*" drop; oifname "tap*" drop; }}
    chain output {{ type filter hook output priority raw; policy accept; oifname "tap*" drop; }}
}}
table arp {TABLE}
delete table arp {TABLE}
table arp {TABLE} {{
    chain input {{ type filter hook input priority -300; policy accept; iifname "tap*" drop; }}
    chain output {{ type filter hook output priority -300; policy accept; oifname "tap*" drop; }}
}}
"""
# the namespace's side: a stub host for its guests, routing nothing anywhere
NETNS_SYSCTLS = {"net.ipv4.ip_forward": "0", "net.ipv6.conf.all.forwarding": "0",
                 "net.ipv6.conf.all.accept_ra": "0", "net.ipv6.conf.default.accept_ra": "0",
                 "net.ipv4.conf.all.rp_filter": "1", "net.ipv4.conf.default.rp_filter": "1"}


def log(message: str) -> None:
    print(f"guestnet: {message}", flush=True)


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def links(netns: str | None = None) -> list[dict[str, Any]]:
    return list(json.loads(ip("-d", "-j", "link", "show", netns=netns) or "[]"))


def host_rules() -> None:
    done = subprocess.run(["nft", "-f", "-"], input=RULES, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"nft: exit {done.returncode}: {done.stderr.strip()}")


def ensure_netns(netns: str, gateway: str) -> None:
    """The namespace as it must be: lo, the bridge with the gateway and nothing else but guests' taps; a
    namespace found already there (a restart, or something planted) is cleaned to that."""
    if not os.path.exists(f"/run/netns/{netns}"):
        ip("netns", "add", netns)
        log(f"made network namespace {netns}")
    for key, value in NETNS_SYSCTLS.items():
        done = subprocess.run(["nsenter", f"--net=/run/netns/{netns}", "--", "sysctl", "-q", "-w", f"{key}={value}"],
                              capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"sysctl {key}={value} in {netns}: {done.stderr.strip()}")
    for link in links(netns):
        name = str(link["ifname"])
        if name not in ("lo", BRIDGE) and not name.startswith("tap"):
            ip("link", "del", name, netns=netns)
            log(f"removed {name} from {netns}: not the guest network's")
    ip("link", "set", "lo", "up", netns=netns)
    if BRIDGE not in {link["ifname"] for link in links(netns)}:
        ip("link", "add", BRIDGE, "type", "bridge", netns=netns)
    ip("addr", "flush", "dev", BRIDGE, netns=netns)
    ip("addr", "add", gateway, "dev", BRIDGE, netns=netns)
    ip("link", "set", BRIDGE, "up", netns=netns)


def connect() -> Any:
    return openstack.connect(
        auth_url=os.environ["KILN_KEYSTONE_URL"], username="neutron",
        password=os.environ["KILN_NEUTRON_SERVICE_PASSWORD"], project_name="service",
        user_domain_name="Default", project_domain_name="Default", region_name=os.environ.get("KILN_REGION"),
    )


class PortNames:
    """The tap names of the ports on the guest network's physical network (whatever a network there is
    called: found by its provider attribute, which only an admin sets), looked up again when an unknown
    tap shows up, at most every 2 s."""

    def __init__(self, physnet: str) -> None:
        self.physnet = physnet
        self.conn: Any = None
        self.names: set[str] = set()
        self.looked = 0.0

    def refresh(self) -> None:
        try:
            if self.conn is None:
                self.conn = connect()
            nets = list(self.conn.network.networks(provider_physical_network=self.physnet))
            ports = [p for net in nets for p in self.conn.network.ports(network_id=net.id)]
        except Exception as exc:  # Neutron restarting: try again later (the host's rules hold meanwhile)
            log(f"could not list the ports on {self.physnet}: {exc}")
            self.conn = None
            return
        self.names = {("tap" + str(p.id))[:14] for p in ports}

    def __contains__(self, tap: str) -> bool:
        if tap not in self.names and time.monotonic() - self.looked > 2:
            self.looked = time.monotonic()
            self.refresh()
        return tap in self.names


def attach(name: str, netns: str) -> None:
    """A tap in the namespace onto the bridge, as an isolated port (no guest reaches another), then up."""
    ip("link", "set", name, "master", BRIDGE, netns=netns)
    ip("link", "set", "dev", name, "type", "bridge_slave", "isolated", "on", netns=netns)
    ip("link", "set", name, "up", netns=netns)


def step(netns: str, ports: PortNames) -> None:
    for link in links(netns):
        name = str(link["ifname"])
        if not name.startswith("tap"):
            continue
        flags = link.get("flags", [])
        if link.get("master") != BRIDGE or "UP" not in flags:
            attach(name, netns)  # a move cut short: finish it
            log(f"put {name} on {BRIDGE}")
        elif "LOWER_UP" not in flags:
            ip("link", "del", name, netns=netns, check=False)
            log(f"deleted {name}: its guest is gone")
    for link in links():
        name = str(link["ifname"])
        if not name.startswith("tap") or "LOWER_UP" not in link.get("flags", []) or name not in ports:
            continue
        ip("link", "set", name, "netns", netns)
        attach(name, netns)
        log(f"moved {name} ({link.get('address', '?')}) into {netns}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--netns", required=True)
    p.add_argument("--gateway", required=True, help="the bridge's address in the namespace, CIDR")
    p.add_argument("--physnet", required=True, help="the physical network whose ports' taps belong here")
    args = p.parse_args()
    running = True

    def stop(*_: Any) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host_rules()
    ensure_netns(args.netns, args.gateway)
    log(f"ready: taps of {args.physnet} go into {args.netns} ({args.gateway} on {BRIDGE}); "
        f"the host drops everything from and to tap* (nftables {TABLE})")
    ports = PortNames(args.physnet)
    while running:
        try:
            step(args.netns, ports)
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
            log(f"error: {exc}")
        time.sleep(POLL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
