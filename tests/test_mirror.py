from __future__ import annotations

from pathlib import Path

import pytest

from kiln.errors import SpecError
from kiln.mirror import host_mirrors, resolve_mirror


def test_deb822_sources_skip_security(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n")
    assert host_mirrors(tmp_path) == ["http://mirror.example/debian"]


def test_one_line_sources_with_options(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb [signed-by=/k.gpg arch=amd64] http://mirror.example/debian/ bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n")
    assert host_mirrors(tmp_path) == ["http://mirror.example/debian"]


def test_precedence_spec_then_dib_variable() -> None:
    env = {"DIB_DISTRIBUTION_MIRROR": "http://dib.example/debian/"}
    assert resolve_mirror("http://spec.example/debian", env) == "http://spec.example/debian"
    assert resolve_mirror(None, env) == "http://dib.example/debian"


def test_no_mirror_anywhere_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("kiln.mirror.APT_DIR", tmp_path)
    with pytest.raises(SpecError, match="no package mirror"):
        resolve_mirror(None, {})
