"""The matrix file: validation with errors naming file and field, cell expansion, --only, host slot demand,
the summary table."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.model.matrix import (
    CellResult,
    MatrixError,
    cell_demand,
    default_limits,
    expand,
    limit_name,
    load_cells,
    load_matrix,
    parse_matrix,
    parse_only,
    select,
    summary_table,
)
from kiln.model.spec import Arch, Firmware

REPO = Path(__file__).resolve().parent.parent
NIGHTLY = REPO / "images" / "nightly.yaml"


def write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "m.yaml"
    f.write_text(text)
    return f


def test_nightly_has_bookworm_and_trixie_for_amd64_and_arm64() -> None:
    matrix, cells = load_cells(NIGHTLY)
    assert matrix.name == "nightly"
    assert [c.name for c in cells] == ["debian-bookworm-amd64", "debian-bookworm-arm64", "debian-trixie-amd64",
                                       "debian-trixie-arm64"]
    by_name = {c.name: c for c in cells}
    arm = by_name["debian-trixie-arm64"].spec
    assert arm.arch is Arch.arm64 and arm.release == "trixie"
    assert arm.boot_test.firmware == [Firmware.uefi]  # the arm64 axis value's own fields
    amd = by_name["debian-bookworm-amd64"].spec
    assert amd.boot_test.firmware == [Firmware.bios, Firmware.uefi, Firmware.uefi_secureboot]
    assert amd.boot_test.timeout == 900
    assert all("cloud-init" in c.spec.elements for c in cells)  # the base spec


def test_axis_value_fields_merge_like_flags(tmp_path: Path) -> None:
    f = write(tmp_path, """
name: t
base: {elements: [vm], env: {A: "1"}, packages: [htop]}
axes:
  release:
    bookworm: {add_elements: [growroot], env: {B: "2"}}
    trixie: {elements: [cloud-init], add_packages: [curl]}
""")
    cells = {c.axes["release"]: c.spec for c in load_cells(f)[1]}
    assert cells["bookworm"].elements == ["vm", "growroot"]
    assert cells["bookworm"].env == {"A": "1", "B": "2"}
    assert cells["trixie"].elements == ["cloud-init"]
    assert cells["trixie"].packages == ["curl", "htop"]
    assert cells["trixie"].name == "debian-trixie-amd64"


def test_list_shorthand_exclude_and_name_template(tmp_path: Path) -> None:
    f = write(tmp_path, """
cell_name: "{release}_{arch}"
axes:
  release: [bookworm, trixie]
  arch: [amd64, arm64]
exclude:
  - {release: bookworm, arch: arm64}
""")
    assert [c.name for c in load_cells(f)[1]] == ["bookworm_amd64", "trixie_amd64", "trixie_arm64"]


@pytest.mark.parametrize("text,field,message", [
    ("axes: {release: [bookworm]}\nbogus: 1\n", "bogus", "unknown field"),
    ("axes: {colour: [red]}\n", "axes.colour", "Input should be 'distro', 'release' or 'arch'"),
    ("base: {elemnts: [vm]}\naxes: {release: [bookworm]}\n", "base", "unknown spec field 'elemnts'"),
    ("base: {release: bookworm}\naxes: {release: [trixie]}\n", "(top level)", "base.release"),
    ("base: {name: x}\naxes: {release: [trixie]}\n", "base", "cell_name"),
    ("axes: {release: {bookworm: {size: 4G, colour: red}}}\n", "axes", "'colour'"),
    ("axes: {release: {}}\n", "axes", "axis 'release' has no values"),
    ("axes: {}\n", "axes", "at least 1 item"),
    ("axes: {release: [bookworm]}\nexclude: [{arch: amd64}]\n", "(top level)", "not an axis of this matrix"),
    ("axes: {release: [bookworm]}\ncell_name: '{colour}'\n", "(top level)", "{colour} is not one of"),
    ("name: Night!\naxes: {release: [bookworm]}\n", "name", "lower-case"),
])
def test_errors_name_the_file_and_the_field(tmp_path: Path, text: str, field: str, message: str) -> None:
    f = write(tmp_path, text)
    with pytest.raises(MatrixError) as exc:
        load_cells(f)
    assert f"{f}: field '{field}'" in str(exc.value)
    assert message in str(exc.value)


def test_a_bad_cell_is_named_with_its_axis_values(tmp_path: Path) -> None:
    f = write(tmp_path, "axes:\n  release: [bookworm]\n  arch: [amd64, sparc]\n")
    with pytest.raises(MatrixError, match=r"m\.yaml \(cell release=bookworm, arch=sparc\): field 'arch'"):
        load_cells(f)
    f = write(tmp_path, "axes:\n  release:\n    bookworm: {size: 1M}\n")
    with pytest.raises(MatrixError, match=r"\(cell release=bookworm\): field 'size': .*too small"):
        load_cells(f)


def test_malformed_yaml_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(MatrixError, match=r"m\.yaml:\d+:\d+: malformed YAML"):
        load_matrix(write(tmp_path, "axes: [release\n"))
    with pytest.raises(MatrixError, match="a matrix must be a mapping"):
        load_matrix(write(tmp_path, "- release\n"))


def test_duplicate_cell_names_and_everything_excluded() -> None:
    m = parse_matrix({"cell_name": "{distro}-{release}", "axes": {"release": ["bookworm"], "arch": ["amd64", "arm64"]}},
                     "x.yaml")
    with pytest.raises(MatrixError, match=r"field 'cell_name': .* both named 'debian-bookworm'"):
        expand(m, "x.yaml")
    m = parse_matrix({"axes": {"release": ["bookworm"]}, "exclude": [{"release": "bookworm"}]}, "x.yaml")
    with pytest.raises(MatrixError, match="every cell is excluded"):
        expand(m, "x.yaml")


def test_only_selects_by_every_axis_given() -> None:
    _, cells = load_cells(NIGHTLY)
    assert [c.name for c in select(cells, ["arch=amd64,release=trixie"])] == ["debian-trixie-amd64"]
    assert [c.name for c in select(cells, ["arch=amd64"])] == ["debian-bookworm-amd64", "debian-trixie-amd64"]
    assert len(select(cells, ["release=bookworm", "release=trixie"])) == 4  # one axis: alternatives
    assert len(select(cells, [])) == 4
    assert parse_only(["arch=amd64, release=trixie", "arch=arm64"]) == {"arch": {"amd64", "arm64"},
                                                                        "release": {"trixie"}}


@pytest.mark.parametrize("only,message", [
    (["arch"], "use AXIS=VALUE"),
    (["colour=red"], r"has no axis 'colour' \(axes: release, arch\)"),
    (["arch=sparc"], "not a value of axis 'arch' .*values: amd64, arm64"),
])
def test_only_errors(only: list[str], message: str) -> None:
    _, cells = load_cells(NIGHTLY)
    with pytest.raises(MatrixError, match=message):
        select(cells, only, "images/nightly.yaml")


def test_only_matching_nothing_is_an_error(tmp_path: Path) -> None:
    f = write(tmp_path, "axes:\n  release: [bookworm, trixie]\n  arch: [amd64, arm64]\n"
                        "exclude: [{release: trixie, arch: arm64}]\n")
    _, cells = load_cells(f)
    with pytest.raises(MatrixError, match="selects no cell"):
        select(cells, ["release=trixie,arch=arm64"])


def test_slot_demand_and_limits(tmp_path: Path) -> None:
    _, cells = load_cells(NIGHTLY)
    spec = cells[0].spec  # 4G, qcow2
    assert cell_demand(spec, boot_test=True) == {"cpu": 1, "disk": 2 * 2 + 2, "kvm": 1}
    assert "kvm" not in cell_demand(spec, boot_test=False)
    limits = default_limits(tmp_path / "not-yet" / "store", env={})
    assert limits["cpu"] >= 1 and limits["kvm"] >= 1 and limits["disk"] >= 1
    assert default_limits(tmp_path, env={"KILN_HOST_LIMITS": "cpu=3,kvm=0"})["cpu"] == 3
    with pytest.raises(Exception, match="KILN_HOST_LIMITS"):
        default_limits(tmp_path, env={"KILN_HOST_LIMITS": "gpu=1"})
    assert limit_name("disk", "build-7") == "kiln-build-7-disk"


def test_summary_table_has_every_cell_and_the_failures() -> None:
    results = [
        CellResult(name="debian-bookworm-amd64", axes={"release": "bookworm", "arch": "amd64"}, status="built",
                   seconds=61.2, images=["/o/debian-bookworm-amd64/debian-bookworm-amd64.qcow2"],
                   boot_test=[{"firmware": "bios", "passed": True}], flow_run_id="abc-123", worker="w1"),
        CellResult(name="debian-trixie-amd64", axes={"release": "trixie", "arch": "amd64"}, status="failed",
                   seconds=3, error="element 'x': hook install.d/50-fail exited with 1\n  last output: |boom|"),
    ]
    md = summary_table("nightly", results, ui_url="http://127.0.0.1:4200")
    assert md.startswith("# Matrix nightly: 1 of 2 cells built")
    assert "| debian-bookworm-amd64 | bookworm | amd64 | built | 61 | debian-bookworm-amd64.qcow2 | bios passed |" in md
    assert "(http://127.0.0.1:4200/runs/flow-run/abc-123) on w1" in md
    assert "| debian-trixie-amd64 | trixie | amd64 | **FAILED** | 3 | - | skipped |" in md
    assert "- **debian-trixie-amd64**: element 'x': hook install.d/50-fail exited with 1" in md
