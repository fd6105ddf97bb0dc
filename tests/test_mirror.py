from __future__ import annotations

from pathlib import Path

import pytest

from kiln.model.errors import SpecError
from kiln.sources.mirror import MirrorUnavailable, host_mirrors, release_digest, resolve_mirror


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
    monkeypatch.setattr("kiln.sources.mirror.APT_DIR", tmp_path)
    with pytest.raises(SpecError, match="no package mirror"):
        resolve_mirror(None, {})


def test_release_digest_follows_the_mirror_publication(tmp_path: Path) -> None:
    import hashlib
    import http.server
    import threading

    suite = tmp_path / "dists" / "bookworm"
    suite.mkdir(parents=True)
    (suite / "InRelease").write_bytes(b"Origin: Debian\nDate: 1\n")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, directory=str(tmp_path), **kw)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        mirror = f"http://127.0.0.1:{server.server_address[1]}"
        first = release_digest(mirror, "bookworm")
        assert first == hashlib.sha256(b"Origin: Debian\nDate: 1\n").hexdigest()
        (suite / "InRelease").write_bytes(b"Origin: Debian\nDate: 2\n")
        assert release_digest(mirror, "bookworm") != first
        with pytest.raises(MirrorUnavailable, match="has no release 'nosuch'"):
            release_digest(mirror, "nosuch")
    finally:
        server.shutdown()


def test_dead_mirror_is_a_clear_error() -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(MirrorUnavailable, match=f"mirror http://127.0.0.1:{port} does not answer"):
        release_digest(f"http://127.0.0.1:{port}", "bookworm", timeout=2, backoff=0.1)


def test_ubuntu_needs_a_mirror_of_its_own_on_a_debian_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kiln.sources.mirror.host_distro", lambda: "debian")
    with pytest.raises(SpecError, match=r"distro ubuntu: no mirror.*'mirror'"):
        resolve_mirror(None, {}, distro="ubuntu")
    assert resolve_mirror("http://u.invalid/ubuntu/", {}, distro="ubuntu") == "http://u.invalid/ubuntu"
    assert resolve_mirror(None, {"DIB_DISTRIBUTION_MIRROR": "http://u.invalid/u"}, distro="ubuntu") == \
        "http://u.invalid/u"
    # an upstream Ubuntu image, or a Red Hat family one, brings its own repositories
    assert resolve_mirror(None, {}, distro="ubuntu", bootstrapped=False) == ""
    assert resolve_mirror(None, {}, distro="fedora", bootstrapped=False) == ""
