from __future__ import annotations

from pathlib import Path

import pytest

from kiln.model.errors import SpecError
from kiln.model.spec import Arch, ImageFormat, load_spec, merge_overrides, parse_size, spec_from_dict

REPO = Path(__file__).resolve().parent.parent


def test_default_spec_file_loads() -> None:
    spec = load_spec(REPO / "images/debian-12.yaml")
    assert spec.name == "debian-12-amd64"
    assert spec.release == "bookworm"
    assert spec.arch is Arch.amd64
    assert "vm" in spec.elements and "cloud-init" in spec.elements
    assert spec.formats == [ImageFormat.qcow2]


def test_name_defaults_from_distro_release_arch() -> None:
    assert spec_from_dict({"release": "trixie", "arch": "arm64"}, "x").name == "debian-trixie-arm64"


@pytest.mark.parametrize("text", ["4G", "4GiB", "4096M", "4 G"])
def test_sizes(text: str) -> None:
    assert parse_size(text) == 4 * 1024**3


def test_unknown_field_names_file_and_field(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("name: x\nelemnts: [vm]\n")
    with pytest.raises(SpecError) as exc:
        load_spec(f)
    assert str(f) in str(exc.value)
    assert "'elemnts'" in str(exc.value)
    assert "unknown field" in str(exc.value)


def test_bad_value_in_nested_field(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("boot_test:\n  firmware: [coreboot]\n")
    with pytest.raises(SpecError, match=r"field 'boot_test\.firmware\.0'"):
        load_spec(f)


def test_malformed_yaml_names_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("name: x\nelements: [vm\n")
    with pytest.raises(SpecError, match=r"bad\.yaml:\d+:\d+: malformed YAML"):
        load_spec(f)


def test_spec_must_be_mapping(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("- vm\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(f)


@pytest.mark.parametrize("field,value,message", [
    ("arch", "sparc", "field 'arch'"),
    ("size", "10M", "too small"),
    ("size", "255M", "too small"),
    ("size", "lots", "not a size"),
    ("elements", ["../../etc"], "element name"),
    ("name", "../evil", "image name"),
    ("packages", ["bad name"], "package name"),
    ("env", {"1X": "y"}, "environment variable"),
    ("mirror", "ftp://x", "mirror"),
])
def test_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        spec_from_dict({field: value}, "flags")


def test_flags_add_elements_and_override_scalars(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("elements: [vm]\nsize: 4G\nenv: {A: '1'}\n")
    spec = load_spec(f, {"add_elements": ["cloud-init", "vm"], "size": "8G", "env": {"B": "2"},
                         "add_packages": ["htop"]})
    assert spec.elements == ["vm", "cloud-init"]
    assert spec.size == 8 * 1024**3
    assert spec.env == {"A": "1", "B": "2"}
    assert spec.packages == ["htop"]


def test_merge_ignores_unset_flags() -> None:
    assert merge_overrides({"release": "bookworm"}, {"release": None}) == {"release": "bookworm"}


def test_a_distro_kiln_cannot_bootstrap_needs_a_base() -> None:
    with pytest.raises(SpecError, match=r"s.yaml: .*distro rocky: kiln bootstraps only debian and ubuntu.*base:"):
        spec_from_dict({"distro": "rocky", "release": "9"}, "s.yaml")
    spec = spec_from_dict({"distro": "rocky", "release": "9", "base": {"source": "rocky"}}, "s.yaml")
    assert spec.distro.value == "rocky"
    assert spec_from_dict({"distro": "ubuntu", "release": "noble"}, "s.yaml").name == "ubuntu-noble-amd64"


def test_ubuntu_bootstraps_main_and_universe_against_its_archive_keyring(tmp_path: Path) -> None:
    from kiln.sources.bootstrap import BootstrapRequest, archive_keyring, mmdebstrap_argv

    key = tmp_path / "ubuntu-archive-keyring.gpg"
    key.write_bytes(b"key")
    req = BootstrapRequest("ubuntu", "noble", "amd64", "http://u.invalid/ubuntu",
                           keyring=archive_keyring("ubuntu", key))
    argv = mmdebstrap_argv(req, tmp_path / "root", tmp_path / "debs")
    assert "--components=main,universe" in argv and f"--keyring={key}" in argv
    assert argv[-3:] == ["noble", str(tmp_path / "root"), "http://u.invalid/ubuntu"]
    debian = BootstrapRequest("debian", "bookworm", "amd64", "http://d.invalid/debian")
    assert "--components=main" in mmdebstrap_argv(debian, tmp_path / "r", tmp_path / "d")
    assert "keyring" not in debian.key_fields() and req.key_fields()["components"] == ["main", "universe"]
    with pytest.raises(SpecError, match=r"mirror_keyring .*: no such file"):
        archive_keyring("ubuntu", tmp_path / "missing.gpg")


def test_ubuntu_without_its_archive_keyring_is_refused_before_bootstrapping(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:
    from kiln.sources.bootstrap import archive_keyring

    monkeypatch.setattr("kiln.sources.bootstrap.UBUNTU_KEYRING", tmp_path / "none.gpg")
    with pytest.raises(SpecError, match=r"distro ubuntu: no keyring for the Ubuntu archive.*mirror_keyring"):
        archive_keyring("ubuntu", None)
    assert archive_keyring("debian", None) is None


def test_ssh_login_needs_root_login() -> None:
    with pytest.raises(SpecError, match="ssh_login needs root_login"):
        spec_from_dict({"boot_test": {"ssh_login": True}}, "s.yaml")
    assert spec_from_dict({"boot_test": {"ssh_login": True, "root_login": True}}, "s.yaml").boot_test.ssh_login
