"""Content digests and package diffs between two builds' manifests (dpkg's version order), the matrix's
publish: section, and how the summary table reports a refresh."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kiln.model.matrix import CellResult, MatrixError, expand, parse_matrix, publish_text, summary_table
from kiln.model.pkgdiff import DiffInputError, content_digest, load_manifest, package_diff, version_newer


def _m(installed: list[tuple[str, str, str]], **spec: object) -> dict[str, object]:
    return {"build_id": "b", "spec": {"name": "x", "release": "bookworm", **spec},
            "elements": [{"name": "vm", "sha256": "1"}],
            "packages": [{"name": n, "version": v, "arch": "amd64", "suite": s} for n, v, s in installed]}


def test_content_is_packages_elements_and_spec_but_not_where_or_how_it_is_published() -> None:
    a = _m([("bash", "5.2", "bookworm")], publish={"targets": ["glance:a"]})
    assert content_digest(a) == content_digest(_m([("bash", "5.2", "bookworm")], publish={"targets": ["s3://bucket/c"]},
                                                  boot_test={"timeout": 5}))
    assert content_digest(a) != content_digest(_m([("bash", "5.3", "bookworm")]))
    assert content_digest(a) != content_digest(_m([("bash", "5.2", "bookworm")], packages=["htop"]))
    changed_element = _m([("bash", "5.2", "bookworm")])
    changed_element["elements"] = [{"name": "vm", "sha256": "2"}]
    assert content_digest(a) != content_digest(changed_element)


def test_package_diff_follows_dpkg_version_order_and_marks_security_uploads() -> None:
    old = _m([("openssl", "3.0.20-1~deb12u2", "bookworm"), ("tzdata", "2026b-0+deb12u1", "bookworm"),
              ("epoch", "1:2.0", "bookworm"), ("gone", "1", "bookworm"), ("same", "1", "bookworm")])
    new = _m([("openssl", "3.0.22-1~deb12u2", "bookworm-security"), ("tzdata", "2026f-0+deb12u1", "bookworm-updates"),
              ("epoch", "2.9", "bookworm"), ("new", "0.1", "bookworm-security"), ("same", "1", "bookworm")])
    diff = package_diff(old, new)
    assert diff.upgraded == [
        {"name": "openssl", "old": "3.0.20-1~deb12u2", "new": "3.0.22-1~deb12u2", "security": True},
        {"name": "tzdata", "old": "2026b-0+deb12u1", "new": "2026f-0+deb12u1", "security": False}]
    assert diff.downgraded == [{"name": "epoch", "old": "1:2.0", "new": "2.9"}]  # an epoch outranks the rest
    assert diff.added == [{"name": "new", "version": "0.1", "security": True}]
    assert diff.removed == [{"name": "gone", "version": "1"}]
    assert diff.summary() == "2 upgraded (2 security), 1 added, 1 removed, 1 downgraded"
    assert "  ~ openssl 3.0.20-1~deb12u2 -> 3.0.22-1~deb12u2  [security]" in diff.lines()
    assert package_diff(old, old).empty and package_diff(old, old).summary() == "no package changes"


def test_a_manifest_that_is_not_one_is_named(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(DiffInputError, match=re.escape(f"{tmp_path}/manifest.json: not a kiln manifest")):
        load_manifest(tmp_path)
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(DiffInputError, match=r"x\.json: not a readable kiln manifest"):
        load_manifest(tmp_path / "x.json")


MATRIX = {"name": "m", "base": {"distro": "debian", "elements": ["vm"]}, "axes": {"release": ["bookworm", "trixie"]}}


def test_the_matrix_publish_section_goes_to_every_cell() -> None:
    cells = expand(parse_matrix({**MATRIX, "publish": {"targets": ["glance:c", "s3://bucket/p"], "keep": 2}}, "m.yaml"))
    assert [c.spec.publish.targets for c in cells] == [["glance:c", "s3://bucket/p"]] * 2
    assert {c.spec.publish.keep for c in cells} == {2}
    with pytest.raises(MatrixError, match="publish is set twice"):
        parse_matrix({**MATRIX, "publish": {}, "base": {**MATRIX["base"], "publish": {}}}, "m.yaml")  # type: ignore[dict-item]
    with pytest.raises(MatrixError, match=r"m.yaml.*ftp://x"):
        expand(parse_matrix({**MATRIX, "publish": {"targets": ["ftp://x"]}}, "m.yaml"), "m.yaml")


def test_the_summary_says_published_unchanged_and_lists_the_package_changes() -> None:
    diff = package_diff(_m([("openssl", "3.0.20-1~deb12u2", "bookworm")]),
                        _m([("openssl", "3.0.22-1~deb12u2", "bookworm-security")])).as_dict()
    changed = CellResult(name="debian-bookworm-amd64", axes={"release": "bookworm"}, status="built",
                         published={"status": "published", "replaces": "20261205T020000Z-aaaaaa", "diff": diff})
    same = CellResult(name="debian-trixie-amd64", axes={"release": "trixie"}, status="built",
                      published={"status": "unchanged"})
    assert publish_text(same) == "unchanged"
    assert publish_text(changed) == "published (1 upgraded (1 security) since 20261205T020000Z-aaaaaa)"
    table = summary_table("m", [changed, same])
    assert "| unchanged |" in table and "## Package changes" in table
    assert "`~ openssl 3.0.20-1~deb12u2 -> 3.0.22-1~deb12u2  [security]`" in table


def test_a_publish_record_never_leaves_its_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The image name and build id of a record come from a manifest (or a cloud): a path in them is refused."""
    from kiln.model.publishing import PublishError
    from kiln.model.record import BuildRecord
    from kiln.publish.refresh import record_published, recorded_manifest

    monkeypatch.setenv("KILN_STATE", str(tmp_path / "state"))
    good = BuildRecord(kiln_version="", build_id="20261206T000000Z-abcdef", spec={"name": "x"}, output=tmp_path)
    assert record_published(good, "debian-12").is_relative_to(tmp_path / "state" / "published" / "debian-12")
    for name, build_id in (("../../etc", "b"), ("x", "../../../tmp/evil"), ("a/b", "b"), ("..", "b")):
        with pytest.raises(PublishError, match="is not a plain name"):
            record_published(BuildRecord(kiln_version="", build_id=build_id, spec={"name": "x"}, output=tmp_path), name)
        assert recorded_manifest(name, build_id) is None
    assert not (tmp_path / "etc").exists() and not (tmp_path / "tmp").exists()


def test_versions_compare_as_dpkg_orders_them_without_dpkg() -> None:
    """Debian's ordering (python-debian's, no subprocess): a plain string comparison gets each of these wrong."""
    assert version_newer("2.36-9+deb12u10", "2.36-9+deb12u9")  # numbers compare as numbers
    assert version_newer("1:0.9", "2.0")  # the epoch wins
    assert version_newer("1.0", "1.0~rc1") and not version_newer("1.0~rc1", "1.0")  # ~ sorts before anything
    assert not version_newer("1.0", "1.0")


def test_rpm_versions_compare_as_rpm_orders_them() -> None:
    """Debian's rules refuse `_` (el9_4): those versions are compared by rpm's rules, not an error."""
    assert version_newer("5.14.0-427.18.1.el9_4", "5.14.0-427.13.1.el9_4")
    assert not version_newer("5.14.0-427.13.1.el9_4", "5.14.0-427.18.1.el9_4")
    assert version_newer("1:1.0-1.el9_4", "2.0-1.el9_4")  # the epoch wins
    assert version_newer("1.0-1.el9_4", "1.0~rc1-1.el9_4") and version_newer("1.0^git1-1_x", "1.0-1_x")
    assert not version_newer("1.0-1.el9_4", "1.0-1.el9_4")
    diff = package_diff({"packages": [{"name": "kernel", "version": "5.14.0-427.13.1.el9_4", "arch": "x86_64"}]},
                        {"packages": [{"name": "kernel", "version": "5.14.0-427.18.1.el9_4", "arch": "x86_64"}]})
    assert [u["name"] for u in diff.upgraded] == ["kernel"]
