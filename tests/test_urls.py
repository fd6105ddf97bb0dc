"""Credentials in mirror and base URLs: used to fetch, never shown, recorded or written into the image."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from kiln.build.plan import make_plan
from kiln.host.run import redact
from kiln.model.spec import spec_from_dict
from kiln.model.urls import credentials_of, scrubbed, without_credentials


def test_credentials_are_found_and_taken_out() -> None:
    url = "https://builder:s3cr3t-t0ken@archive.example/debian"
    assert credentials_of(url) == ["s3cr3t-t0ken", "builder:s3cr3t-t0ken"]
    assert without_credentials(url) == "https://archive.example/debian"
    assert without_credentials("http://archive.example:8080/x?y=1") == "http://archive.example:8080/x?y=1"
    assert credentials_of("https://ghp0123456789abcdef@archive.example/") == ["ghp0123456789abcdef"]
    assert scrubbed({"mirror": url, "list": [url, 3], "name": "a@b"}) == {
        "mirror": "https://archive.example/debian", "list": ["https://archive.example/debian", 3], "name": "a@b"}


def test_a_mirror_with_credentials_fetches_with_them_but_the_image_and_logs_never_see_them(
        make_element: Callable[..., Path], host_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kiln.build.plan.suite_digest", lambda mirror, suite, **_: f"{mirror}|{suite}")
    monkeypatch.setattr("kiln.build.plan.release_epoch", lambda mirror, suite: 1700000000)
    make_element("debian", files={"package-installs.yaml": "systemd-sysv:\n"})
    url = "http://builder:Pr1vate-Token-42@127.0.0.1:9/debian"
    spec = spec_from_dict({"mirror": url, "suites": ["bookworm"]}, "t")
    plan = make_plan(spec, elements_path=[make_element.root], host_env=host_env)  # type: ignore[attr-defined]
    assert plan.mirror == url  # the build fetches with them
    sources = plan.env["KILN_APT_SOURCES"]
    assert "Pr1vate-Token-42" not in sources and "http://127.0.0.1:9/debian" in sources
    assert "Pr1vate-Token-42" not in redact(f"mirror {url} does not answer")
