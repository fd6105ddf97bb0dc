"""Log in to a booted guest over SSH with a password, as an operator would with the password OpenStack
injected: `ssh root@…`, password authentication only, one command run.

Under kiln's QEMU the guest's port 22 is forwarded from a port on the host's 127.0.0.1 by QEMU's user-mode
network (which otherwise keeps the guest off the host: restrict=on). In Nova the client goes to the
server's own address, from inside a network namespace when the cloud's guest network is reached from one
(clouds.yaml `kiln.ssh_netns`; the local stack's guests live in one, off the host's network). The client
reads nothing of the host's SSH setup (no config file, keys, agent or known_hosts); the password reaches it
through SSH_ASKPASS from the environment of that one process, never a file or a command line. Where other
guests share the network (Nova), the guest's host key is one kiln made for this boot and gave it through
the user-data (`host_key_pair`): the client checks it strictly and sends the password to nothing else.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path

from kiln.host.run import run
from kiln.model.errors import CommandError

log = logging.getLogger(__name__)

PROOF = "KILN-SSH-OK"
# what runs in the guest: proves a root shell (uid 0) got it
COMMAND = f'echo "{PROOF} uid=$(id -u)"'
DENIALS = 3
_ASKPASS = "#!/bin/sh\nprintf '%s\\n' \"$KILN_SSH_PASSWORD\"\n"
NETNS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (QEMU binds it for the guest's port 22)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def host_key_pair() -> tuple[str, str]:
    """A fresh ed25519 host key for one guest: (the private key in OpenSSH's format, the public key line)."""
    with tempfile.TemporaryDirectory(prefix="kiln-hostkey-") as tmp:
        key = Path(tmp) / "host_key"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kiln-boot-test", "-f", str(key)], quiet=True,
            what="ssh-keygen (the guest's host key)")
        return key.read_text(), key.with_suffix(".pub").read_text().strip()


def ssh_argv(port: int, user: str, host: str = LOOPBACK, netns: str | None = None,
             known_hosts: Path | None = None) -> list[str]:
    """The client's command line: `host` must be an IP address; with `netns`, run inside the network
    namespace /run/netns/NETNS (nsenter, network namespace only); with `known_hosts`, the host key must be
    the one that file gives (ed25519), else nothing is sent."""
    address = str(ipaddress.ip_address(host))
    prefix: list[str] = []
    if netns is not None:
        if not NETNS_RE.fullmatch(netns):
            raise ValueError(f"network namespace {netns!r}: not a name (letters, digits, '.', '_', '-')")
        prefix = ["nsenter", f"--net=/run/netns/{netns}", "--"]
    checking = (["-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}",
                 "-o", "HostKeyAlgorithms=ssh-ed25519"] if known_hosts is not None
                else ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
    return [*prefix, "ssh", "-F", "/dev/null", "-T", "-p", str(port), *checking,
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "PreferredAuthentications=password,keyboard-interactive", "-o", "PubkeyAuthentication=no",
            "-o", "IdentityAgent=none", "-o", "IdentitiesOnly=yes", "-o", "NumberOfPasswordPrompts=1",
            "-o", "ConnectTimeout=15", "-o", "LogLevel=ERROR",
            f"{user}@{address}", COMMAND]


def ssh_login(port: int, user: str, password: str, *, deadline: float, stop: threading.Event | None = None,
              host: str = LOOPBACK, netns: str | None = None, host_key: str | None = None) -> bool:
    """True once `user` logs in with `password` on `host`:`port` (from inside `netns`, if given) and the
    command runs as root; retried until `deadline` (monotonic) while sshd may still be starting, and never
    once `stop` is set (the guest is gone: its port may then belong to anyone on the host). With `host_key`
    (a public key line), a server that cannot prove it holds that key gets no password."""
    stop = stop or threading.Event()
    where = f"{user}@{host}:{port}" + (f" (network namespace {netns})" if netns else "")
    with tempfile.TemporaryDirectory(prefix="kiln-ssh-") as tmp:
        known_hosts = None
        if host_key is not None:
            known_hosts = Path(tmp) / "known_hosts"
            known_hosts.write_text(f"{ipaddress.ip_address(host)} {' '.join(host_key.split()[:2])}\n")
        argv = ssh_argv(port, user, host, netns, known_hosts)
        askpass = Path(tmp) / "askpass"
        askpass.write_text(_ASKPASS)
        askpass.chmod(stat.S_IRWXU)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "SSH_ASKPASS": str(askpass),
               "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": "", "KILN_SSH_PASSWORD": password}
        attempt = denied = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0 or stop.is_set():
                return False
            try:
                done = run(argv, env=env, timeout=min(30.0, remaining), check=False, quiet=True,
                           what=f"ssh {where}")
            except CommandError as exc:  # timed out
                log.info("boot test: ssh %s, attempt %d: %s", where, attempt, str(exc).splitlines()[0])
                continue
            if done.returncode == 0 and f"{PROOF} uid=0" in done.lines and not stop.is_set():
                log.info("boot test: ssh %s with the injected password: ok (attempt %d)", where, attempt)
                return True
            log.info("boot test: ssh %s, attempt %d: exit %s: %s", where, attempt, done.returncode,
                     _printable(" / ".join(done.lines[-2:])) or "no output")
            # sshd answered and said no: once may be cloud-init still setting the password, thrice is final;
            # a host key other than the one given: not the guest (or it did not take its key), no password sent
            if any("Host key verification failed" in line for line in done.lines):
                log.warning("boot test: ssh %s: the server's host key is not the one kiln gave the guest", where)
                denied += 1
            denied += any("Permission denied" in line for line in done.lines)
            if denied >= DENIALS:
                return False
            if time.monotonic() + 5 >= deadline or stop.wait(5):
                return False


def _printable(text: str, limit: int = 300) -> str:
    """What a guest said, fit for a log line: control characters and escapes out, cut to `limit`."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= limit else clean[:limit] + "…"
