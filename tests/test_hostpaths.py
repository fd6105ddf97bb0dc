"""What a run from the UI or the API may name on the worker's host (kiln.model.hostpaths): fast checks of the
rules; tests/test_deployments.py runs them for real through a deployment."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from kiln.model.errors import SpecError
from kiln.model.hostpaths import allowed_roots, check_remote_run, named_paths
from kiln.model.options import BuildOptions
from kiln.model.spec import spec_from_dict


def test_every_host_path_a_run_names_is_found() -> None:
    spec = spec_from_dict({"mirror": "file:///srv/mirror/debian", "security_mirror": "http://m.invalid/sec",
                           "mirror_keyring": "/etc/keyring.gpg",
                           "base": {"url": ["http://m.invalid/a.qcow2", "file:///srv/b%20c.qcow2"],
                                    "checksum": "sha256:" + "0" * 64, "keyring": "/k.gpg"}}, "t")
    options = BuildOptions(output="out", elements_path=["/e1", "e2"], cache="/c")
    assert named_paths(spec, options) == [
        ("options.output", "out"), ("options.elements_path[0]", "/e1"), ("options.elements_path[1]", "e2"),
        ("options.cache", "/c"), ("spec.mirror", "/srv/mirror/debian"), ("spec.mirror_keyring", "/etc/keyring.gpg"),
        ("spec.base.url[1]", "/srv/b c.qcow2"), ("spec.base.keyring", "/k.gpg")]


def test_paths_outside_the_allowed_roots_are_refused_naming_the_field(tmp_path: Path) -> None:
    repo, cache, extra = tmp_path / "repo", tmp_path / "cache", tmp_path / "extra"
    for d in (repo, cache, extra):
        d.mkdir()
    roots = allowed_roots(f"{extra}", [repo, cache])
    spec = spec_from_dict({}, "t")

    def check(**options: object) -> None:
        check_remote_run(spec, BuildOptions(**options), roots=roots, cwd=repo)  # type: ignore[arg-type]

    check(output="output", cache=str(cache / "sub"), elements_path=[str(extra / "elements")])
    for field, value in (("cache", "/etc"), ("output", "../outside"), ("output", str(repo / ".." / "x")),
                         ("output", "/etc/cron.d")):
        with pytest.raises(SpecError, match=re.escape(f"options.{field}: {value} is outside")):
            check(**{field: value})
    # a link inside an allowed root that leads out of it is followed as the build would
    os.symlink("/etc", repo / "to-etc")
    with pytest.raises(SpecError, match=r"options\.output: to-etc/cron\.d is outside"):
        check(output="to-etc/cron.d")
    with pytest.raises(SpecError, match="not an absolute path"):
        allowed_roots("relative/dir", [repo])


def test_no_secret_values_and_no_shell_in_a_remote_run(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"spec.secrets \(A, B\).*secret_blocks"):
        check_remote_run(spec_from_dict({"secrets": {"B": "x", "A": "y"}}, "t"), None, roots=[tmp_path], cwd=tmp_path)
    with pytest.raises(SpecError, match=r"options\.break_at"):
        check_remote_run(None, BuildOptions(output=str(tmp_path), break_at="after-error"), roots=[tmp_path],
                         cwd=tmp_path)
    # secret blocks are names, not values: allowed
    check_remote_run(spec_from_dict({"secret_blocks": {"PW": "root-pw"}}, "t"), None, roots=[tmp_path], cwd=tmp_path)


def test_a_hook_variable_that_names_a_host_file_is_a_path_to_check(tmp_path: Path) -> None:
    """DIB's apt-conf copies $DIB_APT_CONF into the image from the host: a run from the API may not name
    /root/.ssh/id_ed25519 there. URLs are not paths, file:// ones are."""
    spec = spec_from_dict({"env": {"DIB_APT_CONF": "/root/.ssh/id_ed25519", "DIB_MIRROR": "http://m.invalid/x",
                                   "DIB_LOCAL": "file:///srv/x", "DIB_FLAG": "1"}}, "t")
    assert named_paths(spec, None) == [("spec.env.DIB_APT_CONF", "/root/.ssh/id_ed25519"),
                                       ("spec.env.DIB_LOCAL", "/srv/x")]
    with pytest.raises(SpecError, match=re.escape("spec.env.DIB_APT_CONF: /root/.ssh/id_ed25519 is outside")):
        check_remote_run(spec, None, roots=[tmp_path], cwd=tmp_path)


@pytest.mark.parametrize("name", ["PATH", "LD_PRELOAD", "BASH_ENV", "TARGET_ROOT", "TMP_HOOKS_PATH", "_LIB"])
def test_a_spec_may_not_set_what_changes_which_programs_run(name: str) -> None:
    """A hook outside the chroot runs as root on the host: PATH=root/usr/bin (relative to its working directory)
    would run the image's own binaries there."""
    for field in ("env", "secrets"):
        with pytest.raises(SpecError, match=f"field '{field}': {name}: kiln sets this variable"):
            spec_from_dict({field: {name: "root/usr/bin"}}, "t")
