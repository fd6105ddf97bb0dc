"""kiln.guest_ssh: the SSH client the boot test logs in with reads nothing of the host's SSH setup."""

from __future__ import annotations

import socket
import time

import pytest

from kiln.boot import guest_ssh


def test_the_client_uses_no_host_config_keys_or_agent_and_only_a_password() -> None:
    argv = guest_ssh.ssh_argv(2222, "root")
    assert argv[:3] == ["ssh", "-F", "/dev/null"]
    opts = {argv[i + 1] for i, a in enumerate(argv) if a == "-o"}
    assert {"PubkeyAuthentication=no", "IdentityAgent=none", "UserKnownHostsFile=/dev/null",
            "GlobalKnownHostsFile=/dev/null", "NumberOfPasswordPrompts=1"} <= opts
    assert "root@127.0.0.1" in argv and argv[-1] == guest_ssh.COMMAND


def test_a_login_nobody_answers_fails_by_its_deadline() -> None:
    """A real ssh client against a port nothing listens on: False, within the deadline (not a hang)."""
    port = guest_ssh.free_port()
    start = time.monotonic()
    assert guest_ssh.ssh_login(port, "root", "not-a-secret", deadline=start + 3) is False
    assert time.monotonic() - start < 20


def test_a_server_that_is_not_sshd_is_not_a_login() -> None:
    """Something answers, but it is no sshd that lets root in: False."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        srv.settimeout(0.2)
        port = srv.getsockname()[1]
        start = time.monotonic()
        assert guest_ssh.ssh_login(port, "root", "x", deadline=start + 3) is False


def test_no_attempt_once_the_guest_is_gone() -> None:
    """The console closed (QEMU exited): the forwarded port may be anyone's now, so nothing is sent there."""
    import threading

    gone = threading.Event()
    gone.set()
    start = time.monotonic()
    assert guest_ssh.ssh_login(guest_ssh.free_port(), "root", "x", deadline=start + 30, stop=gone) is False
    assert time.monotonic() - start < 1


def test_a_guest_in_a_network_namespace_is_reached_from_inside_it() -> None:
    """Nova's guests on the local stack: the client runs in the guest network's namespace (nsenter, network
    only) and goes to the server's address; a name that could climb out of /run/netns, or a host that is
    not an address, is refused before anything runs."""
    argv = guest_ssh.ssh_argv(22, "root", "10.254.213.7", "kiln-guests")
    assert argv[:4] == ["nsenter", "--net=/run/netns/kiln-guests", "--", "ssh"]
    assert "root@10.254.213.7" in argv and argv[argv.index("-p") + 1] == "22"
    for bad in ("../1/ns/net", "a/b", "", "-n"):
        with pytest.raises(ValueError, match="network namespace"):
            guest_ssh.ssh_argv(22, "root", "10.254.213.7", bad)
    for host in ("guest.example", "10.0.0.1 -oProxyCommand=x", "-oProxyCommand=x"):
        with pytest.raises(ValueError):
            guest_ssh.ssh_argv(22, "root", host)
