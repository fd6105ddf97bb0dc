"""The Nova boot test: boot an image the way the cloud boots it, through openstacksdk.

A server is created from a Glance image with a flavor and a network from the configuration (`networks:
none` by default: the test needs no network, its user-data comes on a config drive). The user-data is
kiln's boot-test cloud-config with a random marker. kiln waits for ACTIVE, then reads the console log
until the marker and cloud-init's "finished" line appear. Pass or fail, the server is deleted: on a
timeout, on Ctrl-C and on SIGTERM (a cancelled Prefect run raises in the main thread) too, through
try/finally. kiln creates nothing else for it (no key pair, port or volume: Nova's own port for a named
network goes with the server). A failure raises `NovaBootError` with the server's fault and the
console log's tail.

Where the flavor and network come from, first match wins: the caller's arguments (`kiln boot-test
--flavor/--network`), the environment (`KILN_NOVA_FLAVOR`, `KILN_NOVA_NETWORK`), the cloud's entry in
clouds.yaml (a `kiln:` section with `boot_flavor`, `boot_network`, `active_timeout`), then defaults
(the smallest flavor that fits the image; no network).

With `ssh_login` (the build's `boot_test.ssh_login`, as for the seed document's image), the boot test also
does what the seed's operator does: root's password goes in through the config drive's user-data, and
once cloud-init has finished, `ssh root@<the server's address>` with that password must run a command.
The server then goes on the cloud's SSH network (clouds.yaml `kiln.ssh_network`), and when that network
is reached from a network namespace of this host (`kiln.ssh_netns`: the local stack's guest network,
which no host service is on), the SSH client runs inside it.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import openstack.exceptions
from keystoneauth1 import exceptions as ks_exceptions

from kiln.boot import conformance, guest_ssh, seed
from kiln.boot.conformance import suite_of_build
from kiln.boot.serial_console import SerialFacts, clean_console
from kiln.cloud import glance
from kiln.cloud.properties import glance_properties, min_disk_gib, min_ram_mib
from kiln.model.checks import CheckOutcome
from kiln.model.errors import BootTestError, KilnError
from kiln.model.publishing import PublishError, PublishSpec
from kiln.model.record import BuildRecord

if TYPE_CHECKING:
    import openstack.connection

log = logging.getLogger("kiln.nova")

SERVER_PREFIX = "kiln-boot-"
TEMP_IMAGE_TAG = "kiln-boot-test"
DEFAULT_ACTIVE_TIMEOUT = 600  # create -> ACTIVE: scheduling, image download and conversion, spawn
DEFAULT_BOOT_TIMEOUT = 900  # ACTIVE -> cloud-init's end (TCG on a loaded host takes minutes)
DELETE_TIMEOUT = 120
POLL_SECONDS = 5.0
TAIL_LINES = 40
NO_NETWORK = "none"
SSH_TIMEOUT = 180
NETNS_DIR = Path("/run/netns")
EMPTY_CONSOLE = ("(the console log is empty: nothing booted far enough to print on ttyS0; no bootloader, or "
                 "an image without a serial console)")


class NovaError(KilnError):
    """Nova (or the configuration for it) refused or failed a request; the message names the cloud."""


class NovaBootError(BootTestError):
    """The server did not boot to cloud-init's end; carries the reason, Nova's fault and the console tail."""

    def __init__(self, message: str, *, reason: str, fault: str | None, tail: list[str]) -> None:
        self.reason = reason
        self.fault = fault
        self.tail = tail
        text = message
        if tail:
            text += "\n  console log (last lines):\n" + "\n".join(f"    {line}" for line in tail)
        super().__init__(text)


@dataclass(frozen=True)
class NovaSettings:
    """How to boot: a flavor name or id (None: the smallest that fits), `none`, `auto` or a network name
    or id, and the two timeouts; for an SSH login, the network a guest is reached on and the network
    namespace of this host it is reached from (None: the host's own)."""

    flavor: str | None = None
    network: str = NO_NETWORK
    active_timeout: int = DEFAULT_ACTIVE_TIMEOUT
    boot_timeout: int = DEFAULT_BOOT_TIMEOUT
    ssh_network: str | None = None
    ssh_netns: str | None = None


EFI_RE = re.compile(r"\befi: EFI v\d")


@dataclass(frozen=True)
class NovaBootResult:
    passed: bool
    cloud: str
    image_id: str
    server_id: str
    flavor: str
    network: str
    active_seconds: float  # create -> ACTIVE
    seconds: float  # create -> cloud-init's end
    root_bytes: int | None
    disk_bytes: int | None
    console: str = field(repr=False)
    checks: list[CheckOutcome] = field(default_factory=list)  # the conformance suite, both boots
    ssh_ok: bool | None = None  # root's SSH login with the injected password; None when not asked for
    address: str | None = None  # where it logged in

    @property
    def firmware(self) -> str:
        """What the cloud booted the image with, as the guest's kernel saw it: `uefi` when it reported EFI
        (Linux prints "efi: EFI v…" booted from UEFI firmware), else `bios`."""
        return "uefi" if EFI_RE.search(self.console) else "bios"


def cloud_label(conn: openstack.connection.Connection) -> str:
    return glance.cloud_name(conn)


def sdk_errors(conn: openstack.connection.Connection, what: str) -> contextlib.AbstractContextManager[None]:
    """openstacksdk and keystoneauth failures as one NovaError naming the cloud and the step."""
    return glance.sdk_errors(conn, what, error=NovaError)


def settings_for(conn: openstack.connection.Connection, *, flavor: str | None = None, network: str | None = None,
                 boot_timeout: int | None = None, env: Mapping[str, str] | None = None) -> NovaSettings:
    """The settings for this cloud: arguments, then KILN_NOVA_* variables, then clouds.yaml's `kiln:` section."""
    env = os.environ if env is None else env
    section = conn.config.config.get("kiln") or {}
    if not isinstance(section, Mapping):
        raise NovaError(f"cloud {cloud_label(conn)!r}: the 'kiln' entry of clouds.yaml must be a mapping")
    known = ("boot_flavor", "boot_network", "active_timeout", "boot_timeout", "ssh_network", "ssh_netns")
    unknown = set(section) - set(known)
    if unknown:
        raise NovaError(f"cloud {cloud_label(conn)!r}: clouds.yaml kiln.{sorted(unknown)[0]} is not a setting "
                        f"(known: {', '.join(known)})")
    netns = env.get("KILN_NOVA_SSH_NETNS") or section.get("ssh_netns") or None
    if netns is not None and not (isinstance(netns, str) and guest_ssh.NETNS_RE.fullmatch(netns)):
        raise NovaError(f"cloud {cloud_label(conn)!r}: clouds.yaml kiln.ssh_netns {netns!r} is not a network "
                        f"namespace's name (letters, digits, '.', '_', '-')")

    def number(key: str, default: int) -> int:
        value = section.get(key, default)
        if not isinstance(value, int) or value <= 0:
            raise NovaError(f"cloud {cloud_label(conn)!r}: clouds.yaml kiln.{key} must be a positive number of "
                            f"seconds, not {value!r}")
        return value

    return NovaSettings(
        flavor=flavor or env.get("KILN_NOVA_FLAVOR") or section.get("boot_flavor") or None,
        network=network or env.get("KILN_NOVA_NETWORK") or section.get("boot_network") or NO_NETWORK,
        active_timeout=number("active_timeout", DEFAULT_ACTIVE_TIMEOUT),
        boot_timeout=boot_timeout or number("boot_timeout", DEFAULT_BOOT_TIMEOUT),
        ssh_network=env.get("KILN_NOVA_SSH_NETWORK") or section.get("ssh_network") or None,
        ssh_netns=netns,
    )


def require_compute(conn: openstack.connection.Connection) -> None:
    with sdk_errors(conn, "read the service catalog"):
        has = bool(conn.has_service("compute"))
    if not has:
        raise NovaError(f"cloud {cloud_label(conn)!r} has no compute endpoint in its catalog: there is no Nova to "
                        f"boot in (for the local stack: make openstack)")


def pick_flavor(conn: openstack.connection.Connection, wanted: str | None, *, min_ram: int, min_disk: int) -> Any:
    """The named flavor (checked against the image's minimums), or the smallest public one that fits."""
    cloud = cloud_label(conn)
    with sdk_errors(conn, "list flavors"):
        if wanted:
            flavor = conn.compute.find_flavor(wanted, ignore_missing=True)
            if flavor is None:
                names = sorted(f.name for f in conn.compute.flavors())
                raise NovaError(f"cloud {cloud!r}: no flavor {wanted!r} (there are: {', '.join(names) or 'none'})")
            if flavor.ram < min_ram or (flavor.disk and flavor.disk < min_disk):
                raise NovaError(f"cloud {cloud!r}: flavor {flavor.name} ({flavor.ram} MiB, {flavor.disk} GiB) is "
                                f"smaller than the image needs ({min_ram} MiB, {min_disk} GiB)")
            return flavor
        fits = [f for f in conn.compute.flavors() if f.ram >= max(min_ram, 512) and f.disk >= max(min_disk, 1)]
    if not fits:
        raise NovaError(f"cloud {cloud!r}: no flavor has {max(min_ram, 512)} MiB and {min_disk} GiB of disk; "
                        f"name one with --flavor or clouds.yaml kiln.boot_flavor")
    return min(fits, key=lambda f: (f.vcpus, f.ram, f.disk, f.name))


def network_arg(conn: openstack.connection.Connection, network: str) -> str | list[dict[str, str]]:
    """Nova's `networks` value: "none" and "auto" as they are, else the named network's id."""
    if network in (NO_NETWORK, "auto"):
        return network
    with sdk_errors(conn, f"find network {network!r}"):
        found = conn.network.find_network(network, ignore_missing=True)
    if found is None:
        raise NovaError(f"cloud {cloud_label(conn)!r}: no network {network!r} (use --network none to boot without one)")
    return [{"uuid": found.id}]


def fault_text(server: Any) -> str | None:
    fault = getattr(server, "fault", None) or {}
    if not fault:
        return None
    message = str(fault.get("message") or "").strip()
    details = str(fault.get("details") or "").strip().splitlines()
    return message + (f" ({details[-1].strip()})" if details and details[-1].strip() not in message else "")


def console_lines(text: str) -> list[str]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [line for line in (clean_console(raw).rstrip() for raw in text.split("\n")) if line.strip()]


def _sleep_until(deadline: float, seconds: float) -> None:
    time.sleep(max(0.0, min(seconds, deadline - time.monotonic())))


def ssh_network(cloud: str, settings: NovaSettings) -> str:
    """The network a server goes on to be logged in to over SSH: the cloud's SSH network, else the boot
    network when there is one; its namespace, when one is named, must exist on this host."""
    network = settings.ssh_network or (settings.network if settings.network != NO_NETWORK else None)
    if network is None:
        raise NovaError(f"cloud {cloud!r}: the boot test logs in over SSH (boot_test.ssh_login) and the cloud names "
                        f"no network to reach the server on: set kiln.ssh_network in clouds.yaml (and "
                        f"kiln.ssh_netns when this host reaches that network from a network namespace)")
    if not isinstance(network, str) or network in (NO_NETWORK, "auto"):
        raise NovaError(f"cloud {cloud!r}: kiln.ssh_network {network!r} is no network a server can be reached on: "
                        f"name one")
    if settings.ssh_netns is not None and not (NETNS_DIR / settings.ssh_netns).exists():
        raise NovaError(f"cloud {cloud!r}: kiln.ssh_netns names the network namespace {settings.ssh_netns!r}, and "
                        f"this host has none of that name ({NETNS_DIR / settings.ssh_netns} is missing; for the "
                        f"local stack: make openstack)")
    return network


def boot_test(conn: openstack.connection.Connection, image_id: str, *, settings: NovaSettings,
              suite: conformance.Suite | None = None, ssh_login: bool = False,
              on_console: Callable[[str], None] | None = None) -> NovaBootResult:
    """Boot `image_id` in Nova until cloud-init has finished and the conformance `suite` reported (and again
    after a soft reboot through Nova's API); with `ssh_login`, log in as root over SSH in between, with the
    password the user-data set; delete the server whatever happens.

    Raises NovaBootError when the server errors, never becomes ACTIVE, does not print the marker and
    cloud-init's end within the timeouts, refuses the SSH login, or fails a conformance check; NovaError when
    the cloud refuses the request."""
    cloud = cloud_label(conn)
    require_compute(conn)
    with sdk_errors(conn, f"get image {image_id}"):
        image = conn.image.get_image(image_id)
    flavor = pick_flavor(conn, settings.flavor, min_ram=int(image.min_ram or 0), min_disk=int(image.min_disk or 0))
    network = ssh_network(cloud, settings) if ssh_login else settings.network
    networks = network_arg(conn, network)
    marker = "KILN-NOVA-" + secrets.token_hex(8)
    name = SERVER_PREFIX + marker.rsplit("-", 1)[1]
    running = suite is not None and suite.cloud_init
    user_data = seed.boot_test_user_data(
        marker, write_files=conformance.write_files(suite, "nova") if suite is not None and running else ())
    password = secrets.token_urlsafe(12) if ssh_login else None
    host_key: str | None = None
    if password is not None:
        # root's password, and a host key of this boot's: the client gives the password to that key only
        private_key, host_key = guest_ssh.host_key_pair()
        user_data = seed.with_host_key(seed.with_default_user_password(user_data, password), private_key, host_key)
    where = f"cloud {cloud!r}: image {image_id} ({image.name}), flavor {flavor.name}, network {network}"
    server_id: str | None = None
    log.info("%s: booting as server %s", where, name)
    start = time.monotonic()
    try:
        with sdk_errors(conn, f"create server {name}"):
            server = conn.compute.create_server(
                name=name, image_id=image_id, flavor_id=flavor.id, networks=networks, config_drive=True,
                user_data=base64.b64encode(user_data.encode()).decode(), metadata={"kiln": "boot-test"},
            )
        server_id = str(server.id)
        server = _wait_active(conn, server_id, where=where, timeout=settings.active_timeout, start=start)
        active = time.monotonic() - start
        log.info("%s: server %s ACTIVE after %.0f s on %s; reading its console", where, server_id, active,
                 getattr(server, "hypervisor_hostname", None) or "its host")
        facts, console = _wait_console(conn, server_id, marker, where=where, timeout=settings.boot_timeout,
                                       on_console=on_console)
        seconds = time.monotonic() - start
        log.info("%s: cloud-init finished %.0f s after the server was created", where, seconds)
        address = None
        if password is not None:
            address = _login_over_ssh(conn, server_id, password, host_key, settings=settings, where=where,
                                      deadline=start + settings.active_timeout + settings.boot_timeout)
        checks: list[CheckOutcome] = []
        if suite is not None and running:
            deadline = start + settings.boot_timeout + settings.active_timeout
            reports, later = _wait_reports(conn, server_id, suite, where=where, deadline=deadline, first=console)
            # a hard reboot starts a new console log: keep the first boot's too
            console = later if marker in later else f"{console}\n{later}"
            host = conformance.host_checks(suite, root_bytes=facts.root_bytes, disk_bytes=facts.disk_bytes,
                                           agent=None)
            checks = conformance.verdict(suite, reports, host, boots=suite.boots)
            log.info("%s: conformance %s", where, conformance.summary(checks))
            if conformance.failures(checks):
                try:
                    conformance.raise_on_failures(checks, where=f"{where}: server {server_id}",
                                                  serial_log="the server's console log")
                except BootTestError as exc:
                    raise NovaBootError(str(exc), reason="a conformance check failed", fault=None,
                                        tail=console_lines(console)[-TAIL_LINES:]) from None
        return NovaBootResult(True, cloud, image_id, server_id, str(flavor.name), network,
                              round(active, 1), round(seconds, 1), facts.root_bytes, facts.disk_bytes, console,
                              checks, ssh_ok=True if password is not None else None, address=address)
    finally:
        delete_servers(conn, [server_id] if server_id else None, name=name)


def server_address(conn: openstack.connection.Connection, server_id: str) -> str:
    """The server's first fixed IPv4 address (Nova's view of its port): a unicast address of a network, never
    this host's loopback, an unspecified, link-local or multicast one."""
    with sdk_errors(conn, f"get server {server_id}"):
        server = conn.compute.get_server(server_id)
    addresses = server.addresses if isinstance(server.addresses, dict) else {}
    for entries in addresses.values():
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict) or entry.get("version") != 4 \
                    or entry.get("OS-EXT-IPS:type", "fixed") != "fixed":
                continue
            try:
                address = ipaddress.IPv4Address(str(entry.get("addr")))
            except ValueError:
                continue
            if address.is_loopback or address.is_unspecified or address.is_link_local or address.is_multicast:
                raise NovaBootError(f"cloud {cloud_label(conn)!r}: server {server_id}: Nova gives {address} as its "
                                    f"address, which is no guest's", reason=f"the server's address {address} is "
                                    f"no guest's", fault=None, tail=[])
            return str(address)
    raise NovaBootError(f"cloud {cloud_label(conn)!r}: server {server_id} has no IPv4 address to log in to",
                        reason="the server has no IPv4 address", fault=None, tail=[])


def _login_over_ssh(conn: openstack.connection.Connection, server_id: str, password: str, host_key: str | None,
                    *, settings: NovaSettings, where: str, deadline: float) -> str:
    address = server_address(conn, server_id)
    log.info("%s: logging in as root over SSH at %s%s", where, address,
             f" (from network namespace {settings.ssh_netns})" if settings.ssh_netns else "")
    # sshd is up by cloud-init's end; a few minutes for a slow guest, within the boot's own deadline
    ok = guest_ssh.ssh_login(22, "root", password, host=address, netns=settings.ssh_netns, host_key=host_key,
                             deadline=min(deadline, time.monotonic() + SSH_TIMEOUT))
    if not ok:
        raise NovaBootError(f"{where}: server {server_id}: root could not log in over SSH at {address} with the "
                            f"password set through the config drive's user-data",
                            reason=f"root's SSH login at {address} with the injected password failed (sshd "
                                   f"refused it, never answered, or did not show the host key kiln gave the "
                                   f"guest)", fault=None, tail=_tail(conn, server_id))
    return address


def _wait_active(conn: openstack.connection.Connection, server_id: str, *, where: str, timeout: int,
                 start: float) -> Any:
    deadline = start + timeout
    while True:
        with sdk_errors(conn, f"get server {server_id}"):
            server = conn.compute.get_server(server_id)
        status = str(server.status or "").upper()
        if status == "ACTIVE":
            return server
        if status == "ERROR":
            fault = fault_text(server)
            raise NovaBootError(f"{where}: server {server_id} went to ERROR: {fault or 'Nova gave no reason'}",
                                reason=f"Nova put the server in ERROR: {fault or 'no fault recorded'}", fault=fault,
                                tail=_tail(conn, server_id))
        if time.monotonic() >= deadline:
            state = f"{status}, task {server.task_state or '-'}"
            raise NovaBootError(f"{where}: server {server_id} not ACTIVE after {timeout} s ({state})",
                                reason=f"not ACTIVE within {timeout} s ({state})", fault=fault_text(server),
                                tail=_tail(conn, server_id))
        _sleep_until(deadline, POLL_SECONDS)


def _wait_console(conn: openstack.connection.Connection, server_id: str, marker: str, *, where: str, timeout: int,
                  on_console: Callable[[str], None] | None) -> tuple[SerialFacts, str]:
    deadline = time.monotonic() + timeout
    marker_seen = finished_seen = False
    text = ""
    while True:
        with sdk_errors(conn, f"read the console log of server {server_id}"):
            text = str(conn.compute.get_server_console_output(server_id).get("output") or "")
        facts = SerialFacts.parse(text, marker)
        # the console API returns the log's end: what scrolled out of it was still seen
        marker_seen = marker_seen or facts.marker_seen
        finished_seen = finished_seen or facts.finished_seen
        if on_console is not None:
            on_console(text)
        if marker_seen and finished_seen:
            facts.marker_seen = facts.finished_seen = True
            return facts, text
        lines = console_lines(text)
        if facts.fatal:
            raise NovaBootError(f"{where}: server {server_id}: {facts.fatal}: {facts.fatal_line}",
                                reason=f"{facts.fatal} ({facts.fatal_line})", fault=None, tail=lines[-TAIL_LINES:])
        with sdk_errors(conn, f"get server {server_id}"):
            server = conn.compute.get_server(server_id)
        status = str(server.status or "").upper()
        if status != "ACTIVE":
            fault = fault_text(server)
            raise NovaBootError(f"{where}: server {server_id} became {status} before cloud-init finished"
                                + (f": {fault}" if fault else ""), reason=f"the server became {status}"
                                + (f": {fault}" if fault else ""), fault=fault, tail=lines[-TAIL_LINES:])
        if time.monotonic() >= deadline:
            missing = " and ".join(what for what, seen in (("the marker", marker_seen),
                                                            ("cloud-init's end", finished_seen)) if not seen)
            raise NovaBootError(f"{where}: server {server_id}: {missing} not on the console after {timeout} s",
                                reason=f"{missing} not on the console within {timeout} s", fault=None,
                                tail=lines[-TAIL_LINES:] or [EMPTY_CONSOLE])
        _sleep_until(deadline, POLL_SECONDS)


def _wait_reports(conn: openstack.connection.Connection, server_id: str, suite: conformance.Suite, *, where: str,
                  deadline: float, first: str) -> tuple[conformance.Reports, str]:
    """Read the console until the suite reported at the first boot; with `suite.reboot`, reboot the server
    through Nova (SOFT: an ACPI reboot of the guest) and read on until it reported again. A boot that never
    reports is left to the verdict, which fails its checks."""
    reports = conformance.Reports()
    text = first
    for boot in range(1, suite.boots + 1):
        while True:
            for line in console_lines(text):
                reports.feed(line)
            if reports.done(boot) or time.monotonic() >= deadline:
                break
            _sleep_until(deadline, POLL_SECONDS)
            text = _console_while_rebooting(conn, server_id, text)
        if not reports.done(boot):
            log.warning("%s: the conformance suite did not report at boot %d", where, boot)
            break
        if boot < suite.boots:
            log.info("%s: conformance: boot %d reported; rebooting server %s (soft)", where, boot, server_id)
            with sdk_errors(conn, f"reboot server {server_id}"):
                conn.compute.reboot_server(server_id, "SOFT")
    return reports, text


def _console_while_rebooting(conn: openstack.connection.Connection, server_id: str, last: str) -> str:
    """The console log, or `last` while there is none to read: Nova's libvirt driver reboots a guest (SOFT)
    by shutting its domain down and starting it again, and in between answers "Guest does not have a
    console available" (404). A server that is gone is an error."""
    try:
        return str(conn.compute.get_server_console_output(server_id).get("output") or "")
    except openstack.exceptions.NotFoundException:
        with sdk_errors(conn, f"get server {server_id}"):
            conn.compute.get_server(server_id)  # raises when the server itself is gone
        log.info("cloud %r: server %s has no console right now (rebooting)", cloud_label(conn), server_id)
        return last


def _tail(conn: openstack.connection.Connection, server_id: str) -> list[str]:
    try:
        text = conn.compute.get_server_console_output(server_id).get("output") or ""
    except (openstack.exceptions.SDKException, ks_exceptions.ClientException):
        return []
    return console_lines(str(text))[-TAIL_LINES:]


def delete_servers(conn: openstack.connection.Connection, server_ids: list[str] | None, *, name: str,
                   wait: float = DELETE_TIMEOUT) -> None:
    """Delete the boot-test servers (by id, or by their unique name when the create call was interrupted
    before it returned an id) and wait until they are gone. Never raises an ordinary error: a failed clean-up
    is logged with the server's id, so that it does not hide why the boot test ended."""
    try:
        if server_ids is None:
            server_ids = [s.id for s in conn.compute.servers(name=f"^{name}$")]
        for server_id in server_ids:
            conn.compute.delete_server(server_id, ignore_missing=True)
        deadline = time.monotonic() + wait
        for server_id in server_ids:
            while conn.compute.find_server(server_id, ignore_missing=True) is not None:
                if time.monotonic() >= deadline:
                    log.warning("cloud %r: server %s (%s) is still being deleted after %.0f s", cloud_label(conn),
                                server_id, name, wait)
                    break
                time.sleep(2)
            else:
                log.info("cloud %r: deleted server %s (%s)", cloud_label(conn), server_id, name)
    except (openstack.exceptions.SDKException, ks_exceptions.ClientException) as exc:
        log.error("cloud %r: could not delete boot-test server %s (%s): %s; delete it by hand",
                  cloud_label(conn), ", ".join(server_ids or []) or "?", name, exc)


def leftover_servers(conn: openstack.connection.Connection) -> list[str]:
    """Boot-test servers of this project that still exist (none should, once a boot test returned)."""
    with sdk_errors(conn, "list servers"):
        return [f"{s.id} ({s.name}, {s.status})" for s in conn.compute.servers(name=f"^{SERVER_PREFIX}")]


def boot_candidate(cloud: str | None, image_id: str, *, clouds_yaml: Path | None = None, flavor: str | None = None,
                   network: str | None = None, timeout: int | None = None,
                   suite: conformance.Suite | None = None, ssh_login: bool = False) -> NovaBootResult:
    """Boot an image already in Glance (a publish candidate) in the Nova of `cloud`."""
    conn = glance.connect(cloud, clouds_yaml=clouds_yaml)
    return boot_test(conn, image_id, settings=settings_for(conn, flavor=flavor, network=network, boot_timeout=timeout),
                     suite=suite, ssh_login=ssh_login)


# ---------------------------------------------------------------------------------------------------
# `kiln boot-test OUTPUT_DIR --backend nova`


def boot_test_output(build: BuildRecord, *, cloud: str | None, clouds_yaml: Path | None = None,
                     flavor: str | None = None, network: str | None = None,
                     timeout: int | None = None, suite: conformance.Suite | None = None) -> NovaBootResult:
    """Boot a finished build in Nova: its image as already in Glance (same sha512, this project), or
    uploaded as a temporary private image that is deleted afterwards."""
    try:
        spec = build.publish_spec()
    except PublishError:
        spec = PublishSpec()
    image = build.image(spec.disk_format) if spec.disk_format else build.image()
    conn = glance.connect(cloud, clouds_yaml=clouds_yaml)
    require_compute(conn)
    boot_timeout = timeout or int(build.boot_settings.get("timeout") or DEFAULT_BOOT_TIMEOUT)
    settings = settings_for(conn, flavor=flavor, network=network, boot_timeout=boot_timeout)
    ssh_login = bool(build.boot_settings.get("ssh_login"))
    if ssh_login:
        ssh_network(glance.cloud_name(conn), settings)  # refused before anything is uploaded
    same = [i for i in glance.list_images(conn, {"os_hash_value": image.sha512}) if i.status == "active"]
    temporary: str | None = None
    try:
        if same:
            image_id = same[0].id
            log.info("cloud %r: image %s (%s) already holds this build's %s; booting it", glance.cloud_name(conn),
                     image_id, same[0].name, image.file)
        else:
            props = {k: v for k, v in glance_properties(build, image, spec, name=build.name).items()
                     if not k.startswith("kiln_")}
            upload = glance.ImageUpload(
                path=build.image_path(image), name=f"kiln-boot-test-{build.build_id}", disk_format=image.format,
                sha512=image.sha512, sha256=image.sha256, min_disk=min_disk_gib(build),
                min_ram=min_ram_mib(build, spec), properties={**props, "kiln_boot_test": "temporary"},
                tags=[TEMP_IMAGE_TAG],
            )
            uploaded = glance.upload_image(conn, upload)
            temporary = image_id = uploaded.id
        return boot_test(conn, image_id, settings=settings, suite=suite or suite_of_build(build),
                         ssh_login=ssh_login)
    finally:
        if temporary is not None:
            try:
                glance.delete_image(conn, temporary)
                log.info("cloud %r: deleted the temporary image %s", glance.cloud_name(conn), temporary)
            except KilnError as exc:
                log.error("could not delete the temporary image %s: %s; delete it by hand", temporary, exc)
