"""The conformance suite's mechanics: the guest script, its report lines, the verdict, waivers, element checks,
the guest agent's ping and the QEMU plumbing. The suite inside a real guest is in test_build_e2e.py."""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from kiln.boot import conformance, guest_agent
from kiln.boot.conformance import Reports, Suite, guest_script, host_checks, verdict
from kiln.boot.qemu import qemu_argv
from kiln.boot.seed import boot_test_user_data
from kiln.boot.serial_console import SerialFacts
from kiln.build import elements as elements_mod
from kiln.build.elements import ElementCheck, element_checks
from kiln.host.run import redact_value
from kiln.model.checks import BUILTIN, CheckOutcome, check_waivers
from kiln.model.errors import BootTestError, ElementError, SpecError
from kiln.model.spec import spec_from_dict


def line(name: str, result: str, detail: str = "", boot: int = 1) -> str:
    return (f"[  12.3] KILN-CHECK boot={boot} name={name} result={result} "
            f"detail={base64.b64encode(detail.encode()).decode()}")


def all_pass(boot: int, names: list[str]) -> list[str]:
    return [line(n, "pass", "ok", boot) for n in names] + [f"KILN-CHECKS-END boot={boot} count={len(names)}"]


GUEST = [n for n in BUILTIN if n not in ("root-grown", "guest-agent")]
HOST_OK = [CheckOutcome("root-grown", 1, "pass"), CheckOutcome("guest-agent", 1, "pass")]


def fed(lines: list[str]) -> Reports:
    reports = Reports()
    for text in lines:
        reports.feed(text)
    return reports


# ------------------------------------------------------------------------------------------- reports


def test_report_lines_are_read_with_their_details_cleaned() -> None:
    reports = fed([line("failed-units", "fail", "cloud-config.service\x1b[31m\x07"),
                   "garbage KILN-CHECK boot=1 name=x result=maybe detail=",
                   line("failed-units", "pass", "a second line for the same check is not believed"),
                   "KILN-CHECKS-END boot=1 count=1"])
    assert reports.checks == [CheckOutcome("failed-units", 1, "fail", "cloud-config.service [31m")]
    assert reports.done(1) and not reports.done(2)


def test_a_secret_the_guest_prints_in_a_detail_is_redacted() -> None:
    redact_value("Hunter2-conformance")
    reports = fed([line("cloud-init", "fail", "password Hunter2-conformance in the log")])
    assert "Hunter2" not in reports.checks[0].detail


def test_serial_facts_carry_the_reports() -> None:
    facts = SerialFacts.parse("\n".join(all_pass(1, GUEST)), "m")
    assert len(facts.reports.of_boot(1)) == len(GUEST) and facts.reports.done(1)


# ------------------------------------------------------------------------------------------- verdict


def test_every_check_passing_at_both_boots() -> None:
    suite = Suite(arch="amd64")
    outcomes = verdict(suite, fed(all_pass(1, GUEST) + all_pass(2, GUEST)), HOST_OK, boots=2)
    assert conformance.failures(outcomes) == []
    assert len(outcomes) == len(BUILTIN) + len(GUEST)  # the host's checks at the first boot only
    conformance.raise_on_failures(outcomes, where="boot test (bios)", serial_log="/x")


def test_a_failed_check_fails_naming_it_and_what_it_saw() -> None:
    lines = [*all_pass(1, [n for n in GUEST if n != "failed-units"]), line("failed-units", "fail", "kiln-bad.service")]
    outcomes = verdict(Suite(arch="amd64", reboot=False), fed(lines), HOST_OK, boots=1)
    with pytest.raises(BootTestError, match=r"failed-units \(boot 1\): kiln-bad.service"):
        conformance.raise_on_failures(outcomes, where="boot test (bios)", serial_log="/x")


def test_a_check_never_reported_fails_and_a_second_boot_that_never_came_says_why() -> None:
    lines = all_pass(1, GUEST[1:])
    outcomes = verdict(Suite(arch="amd64"), fed(lines), HOST_OK, boots=2, fatal="systemd entered emergency mode")
    failed = {(c.name, c.boot): c.detail for c in conformance.failures(outcomes)}
    assert failed[(GUEST[0], 1)] == "not reported"
    assert failed[("failed-units", 2)] == "the suite did not report at boot 2: systemd entered emergency mode"


def test_a_check_the_host_did_not_ask_for_is_never_a_pass() -> None:
    outcomes = verdict(Suite(arch="amd64", reboot=False), fed(all_pass(1, [*GUEST, "stranger"])), HOST_OK, boots=1)
    assert next(c for c in outcomes if c.name == "stranger").result == "fail"


def test_a_waived_check_runs_and_is_recorded_but_does_not_fail() -> None:
    suite = Suite(arch="amd64", reboot=False, waive=(("time-sync", "the appliance keeps time from its host"),))
    lines = [*all_pass(1, [n for n in GUEST if n != "time-sync"]), line("time-sync", "fail", "none running")]
    outcomes = verdict(suite, fed(lines), HOST_OK, boots=1)
    [waived] = [c for c in outcomes if c.name == "time-sync"]
    assert waived.result == "waived" and "none running" in waived.detail and "appliance" in waived.detail
    assert conformance.failures(outcomes) == []


def test_host_checks() -> None:
    gib = 1 << 30
    suite = Suite(arch="amd64", guest_agent=True)
    grown, agent = host_checks(suite, root_bytes=4 * gib, disk_bytes=4 * gib + (100 << 20), agent="")
    assert grown.result == "pass" and agent.result == "pass"
    grown, agent = host_checks(suite, root_bytes=3 * gib, disk_bytes=5 * gib, agent="no answer")
    assert grown.result == "fail" and agent == CheckOutcome("guest-agent", 1, "fail", "no answer")
    _, agent = host_checks(Suite(arch="amd64"), root_bytes=1, disk_bytes=1, agent=None)
    assert agent.result == "skip" and "not installed" in agent.detail


# ----------------------------------------------------------------------------------------- waivers


def test_waivers_need_a_known_check_and_a_reason() -> None:
    check_waivers({"time-sync": "host time"}, list(BUILTIN))
    with pytest.raises(SpecError, match="no conformance check is named 'tme-sync'"):
        check_waivers({"tme-sync": "typo"}, list(BUILTIN))
    with pytest.raises(SpecError, match="a waiver needs a reason"):
        check_waivers({"time-sync": " "}, list(BUILTIN))


@pytest.mark.parametrize(("waive", "message"), [
    ({"../etc": "x"}, "is not a check name"),
    ({"time-sync": ""}, "needs a reason"),
    ({"Time Sync": "x"}, "is not a check name"),
])
def test_the_spec_refuses_malformed_waivers(waive: dict[str, str], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        spec_from_dict({"boot_test": {"waive": waive}}, "test")


# ----------------------------------------------------------------------------------- element checks


def test_element_checks_are_read_in_order_and_unexecutable_ones_skipped(
        make_element: Callable[..., Path], caplog: pytest.LogCaptureFixture) -> None:
    a = make_element("alpha", hooks={"checks.d/20-b": "exit 0", "checks.d/10-a": "exit 0"})
    make_element("beta", hooks={"checks.d/10-off": "exit 1"}, executable=False)
    resolved = elements_mod.resolve(["alpha", "beta"], [make_element.root])  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING):
        checks = element_checks(resolved)
    assert [c.name for c in checks] == ["alpha/10-a", "alpha/20-b"]
    assert checks[0].content == (a / "checks.d/10-a").read_bytes()
    assert "checks.d/10-off is not executable" in caplog.text


@pytest.mark.parametrize("bad", ["link", "name", "big", "dir"])
def test_element_checks_refuse_links_odd_names_and_big_files(make_element: Callable[..., Path], tmp_path: Path,
                                                             bad: str) -> None:
    d = make_element("gamma")
    checks = d / "checks.d"
    checks.mkdir()
    secret = tmp_path / "host-secret"
    secret.write_text("root:x:0:0\n")
    if bad == "link":
        (checks / "10-shadow").symlink_to(secret)
    elif bad == "name":
        (checks / "10 x").write_text("#!/bin/sh\n")
    elif bad == "big":
        (checks / "10-big").write_bytes(b"#" * (elements_mod.MAX_CHECK_BYTES + 1))
    else:
        (checks / "10-dir").mkdir()
    for f in checks.iterdir():
        if not f.is_symlink():
            f.chmod(0o755)
    resolved = elements_mod.resolve(["gamma"], [make_element.root])  # type: ignore[attr-defined]
    with pytest.raises(ElementError, match=r"element gamma: checks\.d/10"):
        element_checks(resolved)


def test_an_unknown_waiver_fails_the_plan_naming_it(make_element: Callable[..., Path],
                                                     host_env: dict[str, str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.build.plan import make_plan
    monkeypatch.setattr("kiln.build.plan.suite_digest", lambda mirror, suite, **_: f"{mirror}|{suite}")
    monkeypatch.setattr("kiln.build.plan.release_epoch", lambda mirror, suite: 1700000000)
    make_element("debian", files={"package-installs.yaml": "systemd-sysv:\n"})
    make_element("own", hooks={"checks.d/50-own": "exit 0"})
    ok = spec_from_dict({"elements": ["own"], "boot_test": {"waive": {"own/50-own": "known"}}}, "t")
    plan = make_plan(ok, elements_path=[make_element.root], host_env=host_env)  # type: ignore[attr-defined]
    assert [c.name for c in plan.checks] == ["own/50-own"]
    bad = spec_from_dict({"elements": ["own"], "boot_test": {"waive": {"own/50-other": "x"}}}, "t")
    with pytest.raises(SpecError, match="no conformance check is named 'own/50-other'"):
        make_plan(bad, elements_path=[make_element.root], host_env=host_env)  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------ guest script


def _script(**kw: object) -> str:
    return guest_script(Suite(arch="amd64", security_suite="bookworm-security", **kw), "bios")  # type: ignore[arg-type]


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_the_guest_script_parses(shell: str) -> None:
    subprocess.run([shell, "-n"], input=_script(root_login=True), text=True, check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is a host package of make test")
def test_the_guest_script_passes_shellcheck() -> None:
    done = subprocess.run(["shellcheck", "-s", "sh", "-e", "SC2012,SC2015", "-"], input=_script(), text=True,
                          capture_output=True)
    assert done.returncode == 0, done.stdout


def test_user_data_carries_the_script_and_the_elements_checks() -> None:
    suite = Suite(arch="arm64", element_checks=(ElementCheck("own", "50-own", b"#!/bin/sh\nexit 0\n"),))
    data = yaml.safe_load(boot_test_user_data("m", write_files=conformance.write_files(suite, "uefi")))
    files = {f["path"]: base64.b64decode(f["content"]) for f in data["write_files"]}
    script = files[conformance.PER_BOOT_SCRIPT].decode()
    assert "out=/dev/ttyAMA0" in script and "firmware=uefi" in script
    assert files[f"{conformance.GUEST_DIR}/checks.d/own:50-own"] == b"#!/bin/sh\nexit 0\n"
    assert all(f["permissions"] == "0755" for f in data["write_files"])


def test_the_key_changes_with_an_elements_check_and_a_waiver() -> None:
    base = Suite(arch="amd64")
    edited = Suite(arch="amd64", element_checks=(ElementCheck("own", "50-own", b"x"),))
    waived = Suite(arch="amd64", waive=(("time-sync", "r"),))
    assert len({json.dumps(s.key(), sort_keys=True) for s in (base, edited, waived)}) == 3


# --------------------------------------------------------------------------------------- QEMU plumbing


def test_argv_with_the_agent_and_control_ports_and_reboots_allowed() -> None:
    argv = qemu_argv(arch="amd64", firmware="bios", accel="tcg", disk=Path("/w/o.qcow2"), seed_iso=None,
                     serial_socket=Path("/s/serial.sock"), serial_log=Path("/w/s.log"),
                     agent_socket=Path("/s/agent.sock"), control_socket=Path("/s/control.sock"))
    assert "-no-reboot" not in argv
    joined = " ".join(argv)
    assert "virtserialport,bus=vser0.0,chardev=port0,name=org.qemu.guest_agent.0" in joined
    assert "virtserialport,bus=vser0.0,chardev=port1,name=org.kiln.control.0" in joined
    assert "socket,id=port1,path=/s/control.sock,server=on,wait=off" in joined
    plain = qemu_argv(arch="amd64", firmware="bios", accel="tcg", disk=Path("/w/o.qcow2"), seed_iso=None,
                      serial_socket=Path("/s/serial.sock"), serial_log=Path("/w/s.log"))
    assert "-no-reboot" in plain and "virtio-serial-pci,id=vser0" not in plain


def _agent_server(path: Path, behaviour: str) -> threading.Thread:
    """A stand-in for qemu-ga on the far end of the channel (the real agent answers in test_conformance_e2e.py)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn, server:
            for raw in conn.makefile("rb"):
                request = json.loads(raw)
                if behaviour == "flood":
                    conn.sendall(b"x" * 200_000)
                    return
                if behaviour == "silent":
                    continue
                if request["execute"] == "guest-sync":
                    conn.sendall(b"\xff" + json.dumps({"return": request["arguments"]["id"]}).encode() + b"\n")
                elif request["execute"] == "guest-ping":
                    conn.sendall(b'{"return": {}}\n')
                    return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(("behaviour", "answered"), [("agent", True), ("flood", False), ("silent", False)])
def test_guest_ping(tmp_path: Path, behaviour: str, answered: bool) -> None:
    path = tmp_path / "agent.sock"
    _agent_server(path, behaviour)
    start = time.monotonic()
    verdict_text = guest_agent.ping(path, deadline=time.monotonic() + 3)
    assert (verdict_text == "") is answered
    assert time.monotonic() - start < 15
    if not answered:
        assert "did not answer guest-ping" in verdict_text


def test_guest_ping_with_no_agent_at_all(tmp_path: Path) -> None:
    assert "did not answer" in guest_agent.ping(tmp_path / "none.sock", deadline=time.monotonic() + 1)
    assert not os.path.exists(tmp_path / "none.sock")
