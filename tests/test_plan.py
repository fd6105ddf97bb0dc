"""Content keys: they change when what a step reads changes, and only then."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kiln.build import plan as plan_mod
from kiln.build.elements import installed_dib_library
from kiln.build.plan import IMAGE_PACKAGES_STEP, PACKAGE_STEP, BuildPlan, make_plan
from kiln.host.run import redact
from kiln.model.errors import ElementError, SpecError
from kiln.model.options import BuildOptions
from kiln.model.spec import ImageSpec, spec_from_dict
from tasks import plan as tasks_plan


def plan_for(make_element: Callable[..., Path], host_env: dict[str, str], **spec: object) -> BuildPlan:
    s: ImageSpec = spec_from_dict({"elements": ["early", "late"], **spec}, "test")
    return make_plan(s, elements_path=[make_element.root], host_env=host_env)  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def fake_release_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan reads the mirror's InRelease; these tests have no mirror (test_mirror.py serves a real one)."""
    monkeypatch.setattr("kiln.build.plan.suite_digest", lambda mirror, suite, **_: f"{mirror}|{suite}")
    monkeypatch.setattr("kiln.build.plan.release_epoch", lambda mirror, suite: 1700000000)


@pytest.fixture
def elements(make_element: Callable[..., Path]) -> Callable[..., Path]:
    make_element("debian", files={"package-installs.yaml": "systemd-sysv:\n"})
    make_element("early", hooks={"install.d/10-early": "echo early"})
    make_element("late", hooks={"install.d/80-late": "echo late", "finalise.d/90-fin": "echo fin"})
    return make_element


def keys(plan: BuildPlan) -> dict[str, str]:
    return {f"{s.phase}/{s.name}": s.key for s in plan.steps}


def test_steps_in_phase_then_name_order(elements: Callable[..., Path], host_env: dict[str, str]) -> None:
    plan = plan_for(elements, host_env, packages=["htop"])
    ours = [s for s in plan.steps if s.element in ("early", "late", "kiln")]
    assert [f"{s.phase}/{s.name}" for s in ours] == [
        f"install.d/{PACKAGE_STEP}", "install.d/10-early", "install.d/80-late",
        f"install.d/{IMAGE_PACKAGES_STEP}", "finalise.d/90-fin"]
    assert "systemd-sysv" in ours[0].packages  # kiln's own debian element (native: the test's is ignored)
    assert ours[3].packages == ("htop",)


def test_keys_are_stable(elements: Callable[..., Path], host_env: dict[str, str]) -> None:
    assert keys(plan_for(elements, host_env)) == keys(plan_for(elements, host_env))


def test_editing_a_late_hook_keeps_earlier_keys(elements: Callable[..., Path], host_env: dict[str, str]) -> None:
    before = keys(plan_for(elements, host_env))
    (elements.root / "late/install.d/80-late").write_text("#!/bin/bash\necho changed\n")  # type: ignore[attr-defined]
    after = keys(plan_for(elements, host_env))
    assert after["install.d/10-early"] == before["install.d/10-early"]
    assert after[f"install.d/{PACKAGE_STEP}"] == before[f"install.d/{PACKAGE_STEP}"]
    assert after["install.d/80-late"] != before["install.d/80-late"]
    assert after["finalise.d/90-fin"] != before["finalise.d/90-fin"]


def test_chmod_of_a_hook_changes_its_key(elements: Callable[..., Path], host_env: dict[str, str]) -> None:
    before = keys(plan_for(elements, host_env))
    (elements.root / "early/install.d/10-early").chmod(0o700)  # type: ignore[attr-defined]
    after = keys(plan_for(elements, host_env))
    assert after["install.d/10-early"] != before["install.d/10-early"]


def test_touching_mtime_changes_nothing(elements: Callable[..., Path], host_env: dict[str, str]) -> None:
    before = keys(plan_for(elements, host_env))
    os.utime(elements.root / "early/install.d/10-early", (1, 1))  # type: ignore[attr-defined]
    assert keys(plan_for(elements, host_env)) == before


def test_env_value_changes_every_step(elements: Callable[..., Path], host_env: dict[str, str]) -> None:
    before = keys(plan_for(elements, host_env))
    after = keys(plan_for(elements, host_env, env={"DIB_FOO": "1"}))
    assert all(after[k] != before[k] for k in before)
    host = keys(plan_for(elements, {**host_env, "DIB_BAR": "x"}))
    assert all(host[k] != before[k] for k in before)


def test_unrelated_host_variables_do_not_change_keys(elements: Callable[..., Path], host_env: dict[str, str]) -> None:
    before = keys(plan_for(elements, host_env))
    assert keys(plan_for(elements, {**host_env, "HOME": "/elsewhere", "OLDPWD": "/x"})) == before


def test_added_package_only_changes_steps_from_it_on(elements: Callable[..., Path], host_env: dict[str, str]) -> None:
    before = keys(plan_for(elements, host_env, packages=["htop"]))
    after = keys(plan_for(elements, host_env, packages=["htop", "vim"]))
    assert after["install.d/80-late"] == before["install.d/80-late"]
    assert after[f"install.d/{IMAGE_PACKAGES_STEP}"] != before[f"install.d/{IMAGE_PACKAGES_STEP}"]
    assert after["finalise.d/90-fin"] != before["finalise.d/90-fin"]


def test_output_dir_is_not_in_any_key(elements: Callable[..., Path], host_env: dict[str, str],
                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = keys(plan_for(elements, host_env))
    monkeypatch.chdir(tmp_path)
    assert keys(plan_for(elements, host_env)) == before


def test_mirror_changes_the_base(elements: Callable[..., Path], host_env: dict[str, str]) -> None:
    a = plan_for(elements, host_env)
    b = plan_for(elements, host_env, mirror="http://other.invalid/debian")
    assert a.base_key != b.base_key
    assert a.steps[0].key != b.steps[0].key


def test_package_installs_phases_arch_and_pkg_map(make_element: Callable[..., Path], host_env: dict[str, str]) -> None:
    make_element("debian")
    make_element("early", files={
        "package-installs.yaml": "pre-pkg:\n  phase: pre-install.d\nonly-arm:\n  arch: arm64\n"
                                 "not-amd:\n  not-arch: amd64\ngone:\n  uninstall: true\n  phase: post-install.d\n"
                                 "generic-name:\n",
        "pkg-map": '{"family": {"debian": {"generic-name": "debian-name"}}}',
    })
    make_element("late")
    plan = plan_for(make_element, host_env)
    by_name = {f"{s.phase}/{s.name}": s for s in plan.steps}
    assert by_name[f"pre-install.d/{PACKAGE_STEP}"].packages == ("pre-pkg",)
    installs = set(by_name[f"install.d/{PACKAGE_STEP}"].packages)
    assert "debian-name" in installs and "generic-name" not in installs
    assert not installs & {"only-arm", "not-amd"}
    assert by_name["post-install.d/99-package-uninstalls"].packages == ("gone",)
    arm = plan_for(make_element, host_env, arch="arm64")
    arm_installs = {p for s in arm.steps if s.phase == "install.d" for p in s.packages}
    assert {"debian-name", "not-amd", "only-arm"} <= arm_installs


def test_malformed_package_installs_names_element(make_element: Callable[..., Path], host_env: dict[str, str]) -> None:
    make_element("debian")
    make_element("early", files={"package-installs.yaml": "x:\n  phase: nowhere.d\n"})
    make_element("late")
    with pytest.raises(ElementError, match=r"element 'early': package 'x' has phase 'nowhere.d'"):
        plan_for(make_element, host_env)


def test_the_redhat_family_maps_packages_and_tells_install_packages(host_env: dict[str, str]) -> None:
    from kiln.build.packages import map_package
    from kiln.build.plan import hook_env

    pkg_map = {"family": {"debian": {"web": "apache2"}, "redhat": {"web": "httpd"}},
               "distro": {"rocky": {"web": "httpd-rocky"}}}
    assert map_package("web", pkg_map, distro="fedora", release="41") == "httpd"
    assert map_package("web", pkg_map, distro="rocky", release="9") == "httpd-rocky"
    assert map_package("web", pkg_map, distro="ubuntu", release="noble") == "apache2"
    spec = spec_from_dict({"distro": "fedora", "release": "41", "base": {"url": "http://h.invalid/f.qcow2",
                                                                       "checksum": "sha256:" + "0" * 64}}, "s")
    env = hook_env(spec, "", ["fedora"], host_env)
    assert env["DISTRO_NAME"] == "fedora" and env["KILN_PACKAGE_FAMILY"] == "redhat"
    debian = hook_env(spec_from_dict({}, "s"), "http://m.invalid/debian", ["debian"], host_env)
    assert debian["KILN_PACKAGE_FAMILY"] == "debian"


def test_a_distro_brings_its_minimal_base_and_dibs_debian_only_when_named(
        elements: Callable[..., Path], host_env: dict[str, str]) -> None:
    names = [e.name for e in plan_for(elements, host_env).elements]
    assert "debian-minimal" in names and "debian" not in names and "openssh-server" not in names
    plan = plan_for(elements, host_env, elements=["early", "debian"])
    origins = {e.name: e.origin for e in plan.elements}
    assert origins["debian"] == origins["debian-minimal"] == origins["openssh-server"] == "kiln"
    assert origins["early"] == "user"


def test_ssh_login_needs_an_ssh_server(elements: Callable[..., Path], host_env: dict[str, str]) -> None:
    boot = {"root_login": True, "ssh_login": True}
    with pytest.raises(SpecError, match=r"field 'boot_test.ssh_login': the image has no SSH server"):
        plan_for(elements, host_env, boot_test=boot)
    plan_for(elements, host_env, elements=["early", "openssh-server"], boot_test=boot)


def test_elements_path_naming_dibs_library_makes_it_the_library(make_element: Callable[..., Path],
                                                                host_env: dict[str, str]) -> None:
    """ELEMENTS_PATH=<diskimage_builder>/elements, as DIB's docs tell its users, works as --dib-elements."""
    library = installed_dib_library()
    assert library is not None, "the test extra installs diskimage-builder"
    spec = spec_from_dict({"elements": ["growroot", "vm"]}, "test")
    plan = make_plan(spec, host_env={**host_env, "ELEMENTS_PATH": str(library)})
    origins = {e.name: e.origin for e in plan.elements}
    assert origins["growroot"] == "diskimage-builder"  # the user's path wins over kiln's growroot, as in DIB
    assert origins["vm"] == "kiln"  # native
    assert plan.env["_LIB"] == str(library.parent / "lib")


def test_a_build_plans_once(elements: Callable[..., Path], host_env: dict[str, str], tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`kiln build` plans before starting Prefect (bad input fails at once) and hands the plan to the flow's
    plan task, which takes it instead of planning again (no second round of InRelease and checksum fetches);
    a reference is good once, and one from another process (a worker's run) finds nothing."""
    plan = plan_for(elements, host_env)
    ref = plan_mod.hand_over(plan)
    assert plan_mod.take_over(ref) is plan and plan_mod.take_over(ref) is None and plan_mod.take_over(None) is None

    def no_second_plan(*args: Any, **kwargs: Any) -> BuildPlan:
        raise AssertionError("planned twice")

    monkeypatch.setattr(tasks_plan, "make_plan", no_second_plan)
    options = BuildOptions(cache=str(tmp_path / "store"), plan_ref=plan_mod.hand_over(plan))
    ctx = tasks_plan.plan_build.fn(plan.spec, options, "20261207T000000Z-abcdef")
    assert ctx.plan is plan
    with pytest.raises(AssertionError, match="planned twice"):  # the same reference again: planned anew
        tasks_plan.plan_build.fn(plan.spec, options, "20261207T000001Z-abcdef")


def test_kiln_plan_shows_every_stage_with_its_key(elements: Callable[..., Path], host_env: dict[str, str],
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Base, the element steps, pack and convert, each with the key its store entry has; the boot test's
    firmware (its key is the image's sha256, known once the image exists)."""
    import json

    from kiln.cli import main as cli
    from kiln.image.convert import convert_key
    from kiln.image.pack import pack_key_of

    for name, value in host_env.items():
        monkeypatch.setenv(name, value)
    args = cli.parser().parse_args(["plan", "--elements-path", str(elements.root), "-e", "early",  # type: ignore[attr-defined]
                                    "--format", "qcow2,raw", "--json"])
    assert cli.cmd_plan(args) == 0
    shown = json.loads(capsys.readouterr().out)
    plan = plan_for(elements, host_env)
    assert shown["base"]["key"] and shown["base"]["what"].startswith("bootstrap debian")
    assert shown["pack"]["key"] == pack_key_of(make_plan(cli.spec_from_args(args), elements_path=[
        elements.root], host_env=host_env))  # type: ignore[attr-defined]
    assert [c["format"] for c in shown["convert"]] == ["qcow2", "raw"]
    assert shown["convert"][0]["key"] == convert_key(shown["pack"]["key"], "qcow2", "zstd", None)
    assert shown["boot_test"] == {"backend": "qemu", "firmware": ["bios", "uefi"]}
    assert plan.base_key


def test_dib_variables_that_hold_secrets_are_secrets(elements: Callable[..., Path], host_env: dict[str, str]) -> None:
    """DIB_DEV_USER_PASSWORD from the environment reaches the hooks as a secret: not in DIB_ENV (DIB's manifests
    element writes it into the image), not in the plan's environment or its keys in clear, redacted in logs."""
    password = "hunter2-" + os.urandom(4).hex()
    plan = plan_for(elements, {**host_env, "DIB_DEV_USER_PASSWORD": password, "DIB_DEV_USER_USERNAME": "dev"})
    assert plan.spec.secrets["DIB_DEV_USER_PASSWORD"].get_secret_value() == password
    assert "DIB_DEV_USER_PASSWORD" not in plan.env and password not in plan.env["DIB_ENV"]
    assert "DIB_DEV_USER_USERNAME='dev'" in plan.env["DIB_ENV"] or "DIB_DEV_USER_USERNAME=dev" in plan.env["DIB_ENV"]
    assert password not in repr(plan) and password not in str(plan.spec.model_dump(mode="json"))
    assert password not in redact(f"+ echo {password}")
    # a changed password is a changed build (its HMAC is in the keys), as a spec's secret is
    other = plan_for(elements, {**host_env, "DIB_DEV_USER_PASSWORD": password + "x", "DIB_DEV_USER_USERNAME": "dev"})
    assert keys(other) != keys(plan)
