"""kiln.nova against a fake cloud (no OpenStack needed): where the settings come from, how a boot is
judged, and that the server is deleted whatever ends the boot test (success, failure, timeout, Ctrl-C)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openstack.exceptions
import pytest
import yaml

from kiln.boot import nova
from kiln.model.errors import BootTestError
from kiln.publish.gates import GATES, CandidateImage, nova_gate

GOOD_CONSOLE = ("GNU GRUB  version 2.06\n[    1.0] Linux version 6.1\n{marker_line}\n"
                "Cloud-init v. 22.4.2 finished at Sun, 29 Nov 2026 04:30:58 +0000. Up 58.0 seconds\n")


@dataclass
class FakeCompute:
    """The compute proxy calls kiln.nova makes; `console` maps a poll number to the console text."""

    flavors_: list[Any]
    statuses: list[str] = field(default_factory=lambda: ["BUILD", "ACTIVE"])
    console: Callable[[str, int], str] = lambda marker, n: ""
    fault: dict[str, str] | None = None
    raise_on_get: BaseException | None = None
    created: list[dict[str, Any]] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    existing: dict[str, Any] = field(default_factory=dict)
    polls: int = 0

    def find_flavor(self, name: str, ignore_missing: bool = True) -> Any:
        return next((f for f in self.flavors_ if name in (f.name, f.id)), None)

    def flavors(self) -> list[Any]:
        return self.flavors_

    def create_server(self, **attrs: Any) -> Any:
        self.created.append(attrs)
        server = SimpleNamespace(id=f"srv-{len(self.created)}", name=attrs["name"], status="BUILD")
        self.existing[server.id] = server
        return server

    def get_server(self, server_id: str) -> Any:
        if self.raise_on_get is not None:
            raise self.raise_on_get
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return SimpleNamespace(id=server_id, status=status, task_state=None, fault=self.fault,
                               hypervisor_hostname="fake")

    def get_server_console_output(self, server_id: str, length: int | None = None) -> dict[str, str]:
        self.polls += 1
        data = base64.b64decode(self.created[-1]["user_data"]).decode()
        marker = next(line.split("KILN-MARKER=", 1)[1].split("'")[0] for line in data.splitlines()
                      if "KILN-MARKER=" in line)
        return {"output": self.console(marker, self.polls)}

    def delete_server(self, server_id: str, ignore_missing: bool = True) -> None:
        self.deleted.append(server_id)
        self.existing.pop(server_id, None)

    def find_server(self, server_id: str, ignore_missing: bool = True) -> Any:
        return self.existing.get(server_id)

    def servers(self, name: str = "") -> list[Any]:
        prefix = name.strip("^$")
        return [s for s in self.existing.values() if s.name.startswith(prefix)]


class FakeCloud:
    def __init__(self, compute: FakeCompute, *, kiln_section: dict[str, Any] | None = None,
                 has_compute: bool = True) -> None:
        self.compute = compute
        self.config = SimpleNamespace(name="fake", config={"kiln": kiln_section} if kiln_section is not None else {})
        self.image = SimpleNamespace(get_image=lambda image_id: SimpleNamespace(id=image_id, name="img", min_ram=512,
                                                                                min_disk=4))
        self.network = SimpleNamespace(find_network=lambda name, ignore_missing=True:
                                       SimpleNamespace(id="net-1") if name == "private" else None)
        self._has_compute = has_compute

    def has_service(self, kind: str) -> bool:
        return self._has_compute


def flavor(name: str, vcpus: int, ram: int, disk: int) -> Any:
    return SimpleNamespace(id=f"id-{name}", name=name, vcpus=vcpus, ram=ram, disk=disk)


FLAVORS = [flavor("m1.tiny", 1, 512, 1), flavor("kiln.boot", 1, 1024, 10), flavor("m1.small", 1, 2048, 20)]
FAST = nova.NovaSettings(flavor="kiln.boot", active_timeout=60, boot_timeout=60)


@pytest.fixture(autouse=True)
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sleeping advances a fake clock: timeouts run out at once, and polls are counted, not waited for."""
    now = [1000.0]

    def sleep(seconds: float) -> None:
        now[0] += max(seconds, 0.5)

    monkeypatch.setattr(nova.time, "sleep", sleep)
    monkeypatch.setattr(nova.time, "monotonic", lambda: now[0])


def test_settings_come_from_arguments_then_environment_then_clouds_yaml() -> None:
    cloud: Any = FakeCloud(FakeCompute(FLAVORS), kiln_section={"boot_flavor": "kiln.boot", "boot_network": "private",
                                                              "active_timeout": 300})
    assert nova.settings_for(cloud, env={}) == nova.NovaSettings("kiln.boot", "private", 300, 900)
    assert nova.settings_for(cloud, env={"KILN_NOVA_FLAVOR": "m1.small", "KILN_NOVA_NETWORK": "none"}) == \
        nova.NovaSettings("m1.small", "none", 300, 900)
    assert nova.settings_for(cloud, flavor="x", network="auto", boot_timeout=60,
                             env={"KILN_NOVA_FLAVOR": "m1.small"}) == nova.NovaSettings("x", "auto", 300, 60)
    assert nova.settings_for(FakeCloud(FakeCompute(FLAVORS)), env={}) == nova.NovaSettings()  # type: ignore[arg-type]


def test_an_unknown_clouds_yaml_setting_is_named() -> None:
    cloud: Any = FakeCloud(FakeCompute(FLAVORS), kiln_section={"flavor": "kiln.boot"})
    with pytest.raises(nova.NovaError, match=r"kiln\.flavor is not a setting"):
        nova.settings_for(cloud, env={})


def test_without_a_flavor_the_smallest_that_fits_the_image_is_taken() -> None:
    cloud: Any = FakeCloud(FakeCompute(FLAVORS))
    assert nova.pick_flavor(cloud, None, min_ram=1024, min_disk=4).name == "kiln.boot"
    assert nova.pick_flavor(cloud, None, min_ram=0, min_disk=0).name == "m1.tiny"
    with pytest.raises(nova.NovaError, match="smaller than the image needs"):
        nova.pick_flavor(cloud, "m1.tiny", min_ram=1024, min_disk=4)
    with pytest.raises(nova.NovaError, match=r"no flavor 'huge' \(there are: kiln.boot, m1.small, m1.tiny\)"):
        nova.pick_flavor(cloud, "huge", min_ram=0, min_disk=0)


def test_a_boot_passes_on_the_marker_and_cloud_inits_end_and_the_server_is_deleted() -> None:
    compute = FakeCompute(FLAVORS, console=lambda marker, n: "" if n < 3 else
                          GOOD_CONSOLE.format(marker_line=f"KILN-MARKER={marker}\nKILN-ROOT-BYTES=10351427584"))
    cloud: Any = FakeCloud(compute)
    result = nova.boot_test(cloud, "img-1", settings=FAST)
    assert result.passed and result.flavor == "kiln.boot" and result.root_bytes == 10351427584
    [attrs] = compute.created
    assert attrs["config_drive"] is True and attrs["networks"] == "none" and attrs["flavor_id"] == "id-kiln.boot"
    user_data = yaml.safe_load(base64.b64decode(attrs["user_data"]))
    assert "KILN-MARKER=KILN-NOVA-" in str(user_data["runcmd"])
    assert compute.deleted == ["srv-1"] and compute.existing == {}


def test_a_named_network_is_passed_by_id() -> None:
    compute = FakeCompute(FLAVORS, console=lambda m, n: GOOD_CONSOLE.format(marker_line=f"KILN-MARKER={m}"))
    nova.boot_test(FakeCloud(compute), "img", settings=nova.NovaSettings("kiln.boot", "private"))  # type: ignore[arg-type]
    assert compute.created[0]["networks"] == [{"uuid": "net-1"}]
    with pytest.raises(nova.NovaError, match="no network 'nope'"):
        nova.boot_test(FakeCloud(compute), "img", settings=nova.NovaSettings("kiln.boot", "nope"))  # type: ignore[arg-type]


def test_cloud_init_finishing_without_the_marker_is_no_pass() -> None:
    compute = FakeCompute(FLAVORS, console=lambda m, n: GOOD_CONSOLE.format(marker_line="KILN-MARKER=someone-else"))
    with pytest.raises(nova.NovaBootError, match="the marker not on the console after 60 s") as info:
        nova.boot_test(FakeCloud(compute), "img", settings=FAST)  # type: ignore[arg-type]
    assert any("Cloud-init v. 22.4.2 finished" in line for line in info.value.tail)
    assert compute.existing == {}


def test_a_server_in_error_reports_novas_fault_and_is_deleted() -> None:
    compute = FakeCompute(FLAVORS, statuses=["BUILD", "ERROR"],
                          fault={"message": "No valid host was found.", "code": "500", "details": "x\ny"})
    with pytest.raises(nova.NovaBootError, match="went to ERROR: No valid host was found") as info:
        nova.boot_test(FakeCloud(compute), "img", settings=FAST)  # type: ignore[arg-type]
    assert isinstance(info.value, BootTestError) and info.value.fault is not None
    assert compute.deleted == ["srv-1"]


def test_a_fatal_console_line_fails_at_once_with_the_tail() -> None:
    compute = FakeCompute(FLAVORS, console=lambda m, n: "Booting\n[    2.1] Kernel panic - not syncing: VFS\n")
    with pytest.raises(nova.NovaBootError, match="the kernel panicked") as info:
        nova.boot_test(FakeCloud(compute), "img", settings=FAST)  # type: ignore[arg-type]
    assert info.value.tail[-1].endswith("Kernel panic - not syncing: VFS")
    assert compute.polls == 1 and compute.existing == {}


def test_an_empty_console_at_the_timeout_says_so() -> None:
    compute = FakeCompute(FLAVORS)
    with pytest.raises(nova.NovaBootError) as info:
        nova.boot_test(FakeCloud(compute), "img", settings=FAST)  # type: ignore[arg-type]
    assert info.value.reason == "the marker and cloud-init's end not on the console within 60 s"
    assert info.value.tail == [nova.EMPTY_CONSOLE]
    assert compute.existing == {}


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt("signal 15"), SystemExit(1)])
def test_ctrl_c_or_sigterm_while_waiting_still_deletes_the_server(interrupt: BaseException) -> None:
    compute = FakeCompute(FLAVORS, raise_on_get=interrupt)
    with pytest.raises(type(interrupt)):
        nova.boot_test(FakeCloud(compute), "img", settings=FAST)  # type: ignore[arg-type]
    assert compute.deleted == ["srv-1"] and compute.existing == {}


def test_an_interrupted_create_is_cleaned_up_by_the_servers_unique_name() -> None:
    compute = FakeCompute(FLAVORS)
    real_create = compute.create_server

    def create_then_interrupt(**attrs: Any) -> Any:
        real_create(**attrs)  # Nova made the server, but kiln never saw its id
        raise KeyboardInterrupt

    compute.create_server = create_then_interrupt  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        nova.boot_test(FakeCloud(compute), "img", settings=FAST)  # type: ignore[arg-type]
    assert compute.deleted == ["srv-1"] and compute.existing == {}


def test_a_cloud_without_nova_is_refused_before_anything_is_made() -> None:
    compute = FakeCompute(FLAVORS)
    with pytest.raises(nova.NovaError, match="has no compute endpoint"):
        nova.boot_test(FakeCloud(compute, has_compute=False), "img", settings=FAST)  # type: ignore[arg-type]
    assert compute.created == []


def test_the_nova_gate_is_registered_and_needs_an_uploaded_candidate() -> None:
    assert GATES["nova"] is nova_gate
    result = nova_gate(CandidateImage("x", build=None, image=None))  # type: ignore[arg-type]
    assert not result.passed and "glance:CLOUD" in result.detail


def test_the_nova_gate_turns_a_failed_boot_into_a_failed_result_with_the_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    compute = FakeCompute(FLAVORS, console=lambda m, n: "SeaBIOS\nGRUB loading.\nerror: no such device\n"
                          "Entering rescue mode...\ngrub rescue>\n")
    cloud = FakeCloud(compute, kiln_section={"boot_flavor": "kiln.boot"})
    monkeypatch.setattr("kiln.cloud.glance.connect", lambda name, clouds_yaml=None: cloud)
    build = SimpleNamespace(boot_settings={"timeout": 5}, spec={"name": "x"}, base={}, packages=[])
    result = nova_gate(CandidateImage("x", build=build, image=None, cloud="fake", image_id="img"))  # type: ignore[arg-type]
    assert not result.passed
    assert result.detail.startswith("the Nova boot failed: GRUB dropped to its rescue shell")
    assert result.log_tail[-1] == "grub rescue>"
    assert compute.existing == {}


def test_the_nova_gate_boots_with_the_specs_flavor_network_and_timeout() -> None:
    calls: list[tuple[Any, ...]] = []

    def boot(cloud: str | None, image_id: str, **kwargs: Any) -> Any:
        calls.append((cloud, image_id, kwargs))
        return SimpleNamespace(cloud=cloud, flavor="m1.small", network="private", active_seconds=10.0, seconds=70.0,
                               checks=[], ssh_ok=True, address="10.0.0.5")

    build = SimpleNamespace(boot_settings={"timeout": 300, "flavor": "m1.small", "network": "private",
                                           "ssh_login": True},
                            spec={"name": "x", "boot_test": {"waive": {"time-sync": "the test says so"}}}, base={},
                            packages=[{"name": "qemu-guest-agent"}])
    result = nova_gate(CandidateImage("x", build=build, image=None, cloud="c", image_id="img"),  # type: ignore[arg-type]
                       boot=boot)
    assert result.passed and "flavor m1.small" in result.detail
    assert "root's SSH login at 10.0.0.5 ok" in result.detail
    suite = calls[0][2].pop("suite")
    assert calls == [("c", "img", {"clouds_yaml": None, "flavor": "m1.small", "network": "private", "timeout": 300,
                                   "ssh_login": True})]
    # the suite of the candidate's build: its waivers, its packages (the guest agent)
    assert suite.waive == (("time-sync", "the test says so"),) and suite.guest_agent and not suite.cloud_init


def test_the_flows_publish_step_boots_in_nova_through_the_boot_test_task() -> None:
    from kiln.model.publishing import PublishSpec
    from kiln.publish.gates import choose_gates
    from tasks.boot_test import boot_test_nova

    spec = PublishSpec(targets=["glance:a"])
    gate = choose_gates(spec, "nova", has_compute=lambda cloud: True, nova_boot=boot_test_nova)["a"]
    assert gate.func is nova_gate and gate.keywords == {  # type: ignore[attr-defined]
        "boot": boot_test_nova, "flavor": None, "network": None}
    assert choose_gates(spec, "manifest", has_compute=lambda cloud: True)["a"] is GATES["manifest"]


def test_a_nova_boot_test_needs_a_cloud_to_boot_in() -> None:
    from kiln.model.errors import SpecError
    from kiln.model.spec import spec_from_dict

    with pytest.raises(SpecError, match=r"spec.yaml: .*boot_test.backend nova needs a cloud.*boot_test.cloud"):
        spec_from_dict({"boot_test": {"backend": "nova"}}, "spec.yaml")
    assert spec_from_dict({"boot_test": {"backend": "nova", "cloud": "c"}}, "s").boot_test.cloud == "c"
    assert spec_from_dict({"boot_test": {"backend": "nova"}, "publish": {"targets": ["glance:c"]}}, "s")
    assert spec_from_dict({"boot_test": {"backend": "nova", "enabled": False}}, "s")  # nothing to boot


def test_the_firmware_of_a_nova_boot_is_what_the_guest_reported() -> None:
    def result(console: str) -> nova.NovaBootResult:
        return nova.NovaBootResult(True, "c", "i", "s", "f", "none", 1.0, 2.0, None, None, console)

    assert result("[    0.000000] efi: EFI v2.7 by EDK II\n").firmware == "uefi"
    assert result("[    0.000000] BIOS-provided physical RAM map:\n").firmware == "bios"
    assert result("").firmware == "bios"


def test_ssh_settings_come_from_clouds_yaml_and_a_bad_namespace_name_is_refused() -> None:
    cloud: Any = FakeCloud(FakeCompute(FLAVORS), kiln_section={"ssh_network": "guests", "ssh_netns": "kiln-guests"})
    got = nova.settings_for(cloud, env={})
    assert (got.ssh_network, got.ssh_netns) == ("guests", "kiln-guests")
    assert nova.settings_for(cloud, env={"KILN_NOVA_SSH_NETNS": "other"}).ssh_netns == "other"
    for bad in ("../../proc/1/ns/net", "a b", "-x", 5):
        with pytest.raises(nova.NovaError, match=r"kiln\.ssh_netns .* is not a network namespace's name"):
            nova.settings_for(FakeCloud(FakeCompute(FLAVORS), kiln_section={"ssh_netns": bad}), env={})  # type: ignore[arg-type]


def test_an_ssh_login_without_a_network_to_reach_the_guest_on_is_refused_before_any_server() -> None:
    compute = FakeCompute(FLAVORS)
    with pytest.raises(nova.NovaError, match=r"no network to reach the server on: set kiln\.ssh_network"):
        nova.boot_test(FakeCloud(compute), "img-1", settings=FAST, ssh_login=True)  # type: ignore[arg-type]
    assert compute.created == []


def test_an_ssh_login_puts_root_password_in_the_user_data_and_the_server_on_the_ssh_network(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The password goes to cloud-init's default user through the config drive's user-data; the SSH client
    goes to the server's fixed address from the configured namespace; a refused login fails the boot."""
    compute = FakeCompute(FLAVORS, console=lambda marker, n: GOOD_CONSOLE.format(marker_line=f"KILN-MARKER={marker}"))
    calls: list[tuple[str, str | None, str, str]] = []

    def ssh_login(port: int, user: str, password: str, **kw: Any) -> bool:
        calls.append((kw["host"], kw["netns"], password, kw["host_key"]))
        return len(calls) > 1

    monkeypatch.setattr(nova.guest_ssh, "ssh_login", ssh_login)
    monkeypatch.setattr(nova, "NETNS_DIR", tmp_path)
    (tmp_path / "kiln-guests").touch()
    monkeypatch.setattr(nova, "server_address", lambda conn, server_id: "10.254.213.7")
    settings = nova.NovaSettings(flavor="kiln.boot", active_timeout=60, boot_timeout=60, ssh_network="private",
                                 ssh_netns="kiln-guests")
    with pytest.raises(nova.NovaBootError, match=r"root could not log in over SSH at 10\.254\.213\.7"):
        nova.boot_test(FakeCloud(compute), "img-1", settings=settings, ssh_login=True)  # type: ignore[arg-type]
    assert compute.deleted == ["srv-1"]
    result = nova.boot_test(FakeCloud(compute), "img-1", settings=settings, ssh_login=True)  # type: ignore[arg-type]
    assert result.ssh_ok is True and result.address == "10.254.213.7" and result.network == "private"
    created = compute.created[-1]
    assert created["networks"] == [{"uuid": "net-1"}]
    config = yaml.safe_load(base64.b64decode(created["user_data"]).decode())
    password, host_key = calls[-1][2], calls[-1][3]
    assert config["password"] == password and config["ssh_pwauth"] is True and len(password) >= 16
    assert calls[-1][:2] == ("10.254.213.7", "kiln-guests")
    # a host key of this boot's, given to the guest and to the client (which gives the password to it only)
    assert host_key.startswith("ssh-ed25519 ") and config["ssh_keys"]["ed25519_public"] == host_key
    assert "OPENSSH PRIVATE KEY" in config["ssh_keys"]["ed25519_private"] and calls[0][3] != host_key
    assert compute.deleted == ["srv-1", "srv-2"]
    # a namespace this host does not have: said, naming it, before any server
    (tmp_path / "kiln-guests").unlink()
    with pytest.raises(nova.NovaError, match=r"network namespace 'kiln-guests', and this host has none"):
        nova.boot_test(FakeCloud(compute), "img-1", settings=settings, ssh_login=True)  # type: ignore[arg-type]
    assert len(compute.created) == 2
    for bad in ("none", "auto"):
        with pytest.raises(nova.NovaError, match=rf"kiln.ssh_network '{bad}' is no network"):
            nova.ssh_network("c", nova.NovaSettings(ssh_network=bad))


@pytest.mark.parametrize("addresses", [
    {"net": [{"version": 4, "addr": "127.0.0.1"}]}, {"net": [{"version": 4, "addr": "169.254.169.254"}]},
    {"net": [{"version": 4, "addr": "0.0.0.0"}]}, {"net": [{"version": 4, "addr": "224.0.0.1"}]},
])
def test_an_address_no_guest_can_have_is_refused(addresses: dict[str, Any]) -> None:
    class Addressed(FakeCompute):
        def get_server(self, server_id: str) -> Any:
            return SimpleNamespace(id=server_id, status="ACTIVE", addresses=addresses)

    with pytest.raises(nova.NovaBootError, match="which is no guest's"):
        nova.server_address(FakeCloud(Addressed(FLAVORS)), "srv-1")  # type: ignore[arg-type]


def test_a_malformed_address_list_is_no_address() -> None:
    class Addressed(FakeCompute):
        def get_server(self, server_id: str) -> Any:
            return SimpleNamespace(id=server_id, status="ACTIVE",
                                   addresses={"a": "x", "b": [None, {"version": 4, "addr": "not-an-ip"}]})

    with pytest.raises(nova.NovaBootError, match="has no IPv4 address"):
        nova.server_address(FakeCloud(Addressed(FLAVORS)), "srv-1")  # type: ignore[arg-type]


def test_a_console_nova_cannot_show_during_a_reboot_is_waited_for() -> None:
    """Nova's libvirt driver reboots (SOFT) by stopping and starting the domain: in between, the console
    answers 404 "Guest does not have a console available". That is no failure while the server exists."""
    class Rebooting(FakeCompute):
        def get_server_console_output(self, server_id: str, length: int | None = None) -> dict[str, str]:
            self.polls += 1
            if self.polls == 1:
                raise openstack.exceptions.NotFoundException("Guest does not have a console available.")
            return {"output": "after"}

    compute = Rebooting(FLAVORS, statuses=["ACTIVE"])
    cloud: Any = FakeCloud(compute)
    assert nova._console_while_rebooting(cloud, "srv-1", "before") == "before"
    assert nova._console_while_rebooting(cloud, "srv-1", "before") == "after"
    compute.raise_on_get = openstack.exceptions.NotFoundException("no server")
    compute.polls = 0
    with pytest.raises(nova.NovaError, match="get server srv-1"):
        nova._console_while_rebooting(cloud, "srv-1", "before")
