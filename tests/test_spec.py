from __future__ import annotations

from pathlib import Path

import pytest

from kiln.errors import SpecError
from kiln.spec import Arch, ImageFormat, load_spec, merge_overrides, parse_size, spec_from_dict

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
