"""The command line never prints a traceback (issue 19, item 1): every error is one line naming the culprit,
with the documented exit code (2 bad input, 1 failure, 3 gate, 130 interrupted, 141 reader gone); -v, before
or after the subcommand, adds the traceback; options are never abbreviated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e import REPO, kiln_env
from tests.test_record import output


def kiln(args: list[str], tmp_path: Path, **popen: object) -> subprocess.CompletedProcess[str]:
    env = {**kiln_env(), "KILN_STATE": str(tmp_path / "state"), "KILN_CACHE": str(tmp_path / "cache"),
           "OS_CLIENT_CONFIG_FILE": str(tmp_path / "clouds.yaml")}
    env.pop("OS_CLOUD", None)
    (tmp_path / "clouds.yaml").write_text("clouds: {}\n")
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], cwd=REPO, env=env, text=True, timeout=120,
                          **streams)  # type: ignore[call-overload]


OUT = "<output>"  # replaced by a well-formed build output directory
CASES = [
    ("rollback without a cloud", ["rollback", "x"], 2, "cloud configuration: "),
    ("a size that is not one", ["cache", "gc", "--max-size", "big"], 2, "--max-size: not a size: 'big'"),
    ("kiln dib without elements", ["dib"], 2, "the following arguments are required: elements"),
    ("an unknown break point", ["build", "--break", "before-lunch", "--no-boot-test"], 2,
     "--break before-lunch: unknown break point"),
    ("a publish target that is not one", ["publish", OUT, "--to", "ftp://x"], 2, "publish settings: targets"),
    ("keep zero", ["publish", OUT, "--to", "s3://bucket/x", "--keep", "0"], 2, "publish settings: keep"),
    ("no build there", ["publish", "/nonexistent-output", "--to", "s3://bucket/x"], 2,
     "manifest.json: not a kiln build output"),
    ("the nova gate without Glance", ["publish", OUT, "--to", "s3://bucket/x", "--gate", "nova"], 2,
     "the nova gate boots the uploaded candidate"),
    ("no abbreviations", ["publish", OUT, "--clouds", "c.yaml"], 2, "unrecognized arguments: --clouds c.yaml"),
    ("an unknown command", ["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    ("plan: a size that is not one", ["plan", "--size", "big"], 2, "field 'size': not a size: 'big'"),
    ("boot-test: no build there", ["boot-test", "/nonexistent-output"], 2, "manifest.json: not a kiln build output"),
    ("matrix: no such file", ["matrix", "/nonexistent.yaml"], 2, "/nonexistent.yaml: cannot read"),
    ("refresh: no such file", ["refresh", "/nonexistent.yaml"], 2, "/nonexistent.yaml: cannot read"),
    ("diff: no such build", ["diff", "/nonexistent-a", "/nonexistent-b"], 2, "/nonexistent-a: no such file"),
    ("images: not an S3 URL", ["images", "--s3", "nope"], 2, "'nope' is not an S3 URL"),
    ("images: a name with a path", ["images", "../x", "--cloud", "c"], 2, "image name '../x' may only contain"),
    ("server: an unknown action", ["server", "restart"], 2, "invalid choice: 'restart'"),
    ("serve: a port that is not one", ["serve", "--port", "x"], 2, "argument --port: not a port: 'x'"),
    ("serve: a port out of range", ["serve", "--port", "70000"], 2, "port 70000 is not between 1 and 65535"),
    ("diff: an S3 URL that is not one", ["diff", "s3://", "x"], 2, "is not an S3 URL"),
    ("cache: an unknown action", ["cache", "frob"], 2, "invalid choice: 'frob'"),
    ("cache ls: no store there", ["cache", "--cache", "/nonexistent/store", "ls"], 2,
     "--cache /nonexistent/store: no such directory"),
    ("gc: no store there", ["gc", "--cache", "/nonexistent/store"], 2, "--cache /nonexistent/store: no such directory"),
]


@pytest.mark.parametrize(("case", "args", "code", "message"), CASES, ids=[c[0] for c in CASES])
def test_one_line_and_the_documented_exit_code(tmp_path: Path, case: str, args: list[str], code: int,
                                               message: str) -> None:
    args = [str(output(tmp_path)) if a == OUT else a for a in args]
    proc = kiln(args, tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("kiln: error: ") and message in lines[0], proc.stderr


@pytest.mark.parametrize("args", [["-v", "dib"], ["build", "-v", "--size", "big", "--no-boot-test"]])
def test_v_before_or_after_the_subcommand_adds_the_traceback(tmp_path: Path, args: list[str]) -> None:
    proc = kiln(args, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("kiln: error: ")


def test_a_reader_that_goes_away_is_not_an_error_with_a_traceback(tmp_path: Path) -> None:
    """`kiln plan … --json | head -1`: stdout closes before kiln writes."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = kiln(["plan", "images/debian-12.yaml", "--json"], tmp_path, stdout=write)
    finally:
        os.close(write)
    assert proc.returncode == 141 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_help_documents_the_exit_codes(tmp_path: Path) -> None:
    text = kiln(["--help"], tmp_path).stdout
    for line in ("2    bad input", "3    the image did not pass the boot gate", "130  interrupted"):
        assert line in text


def test_cloud_selection_is_the_same_everywhere(tmp_path: Path) -> None:
    """--cloud NAME and --clouds-yaml PATH on every command that talks to a cloud; --flavor and --network
    wherever a Nova boot can happen (issue 19, item 2)."""
    from kiln.cli import main as cli
    from kiln.cli import publish as publish_cli
    from kiln.model.record import BuildRecord

    p = cli.parser()
    clouds = ["--cloud", "prod", "--clouds-yaml", str(tmp_path / "clouds.yaml")]
    nova = ["--flavor", "m1.small", "--network", "none"]
    for command in (["build", "images/debian-12.yaml"], ["boot-test", "out"], ["publish", "out"], ["rollback", "x"]):
        args = p.parse_args([*command, *clouds, *(nova if command[0] != "rollback" else [])])
        assert (getattr(args, "cloud", None) or getattr(args, "boot_cloud", None)) == "prod", command
        assert args.clouds_yaml == tmp_path / "clouds.yaml", command
    build = p.parse_args(["build", "images/debian-12.yaml", *clouds, *nova, "--boot-backend", "nova"])
    spec = cli.spec_from_args(build)
    assert (spec.boot_test.cloud, spec.boot_test.flavor, spec.boot_test.network) == ("prod", "m1.small", "none")
    record = BuildRecord.load(output(tmp_path))
    published = publish_cli.spec_from_args(record.publish_spec(), p.parse_args(["publish", "out", "--cloud", "prod"]))
    assert published.targets == ["glance:prod"]


def test_dibs_variables_are_honoured_or_refused_never_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """DIB_RELEASE, DIB_IMAGE_SIZE, FS_TYPE and DIB_ROOT_LABEL mean the same to kiln build as to kiln dib
    (issue 19, item 5): used where nothing else names the value, an error where they contradict it or ask
    for what kiln does not make."""
    from kiln.cli import dib as dib_cli
    from kiln.cli import main as cli
    from kiln.model.errors import SpecError

    p = cli.parser()
    for name in ("DIB_RELEASE", "DIB_IMAGE_SIZE", "FS_TYPE", "DIB_ROOT_LABEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DIB_RELEASE", "trixie")
    monkeypatch.setenv("DIB_IMAGE_SIZE", "6")
    monkeypatch.setenv("FS_TYPE", "ext4")
    monkeypatch.setenv("DIB_ROOT_LABEL", "cloudimg-rootfs")
    spec = cli.spec_from_args(p.parse_args(["build", "-e", "vm"]))
    assert (spec.release, spec.size) == ("trixie", 6 * 1024**3)
    dib_spec, _ = dib_cli.parse(["-o", "x", "vm", "debian"], dict(os.environ))
    assert (dib_spec.release, dib_spec.size) == ("trixie", 6 * 1024**3)
    with pytest.raises(SpecError, match="DIB_RELEASE=trixie contradicts the release 'bookworm'"):
        cli.spec_from_args(p.parse_args(["build", "--release", "bookworm"]))
    with pytest.raises(SpecError, match="DIB_RELEASE=trixie contradicts the release 'bookworm' of images/debian-12"):
        cli.spec_from_args(p.parse_args(["build", "images/debian-12.yaml"]))
    monkeypatch.delenv("DIB_RELEASE")
    with pytest.raises(SpecError, match="DIB_IMAGE_SIZE=6 contradicts the size 8G"):
        cli.spec_from_args(p.parse_args(["build", "--size", "8G"]))
    with pytest.raises(SpecError, match="size 'abc' of the command line: not a size"):
        cli.spec_from_args(p.parse_args(["build", "--size", "abc"]))
    monkeypatch.delenv("DIB_IMAGE_SIZE")
    for name, value, says in (("FS_TYPE", "xfs", "ext4 root file systems only"),
                              ("DIB_ROOT_LABEL", "root", "labels the root file system cloudimg-rootfs")):
        monkeypatch.setenv(name, value)
        with pytest.raises(SpecError, match=says):
            cli.spec_from_args(p.parse_args(["build"]))
        with pytest.raises(SpecError, match=says):
            dib_cli.parse(["-o", "x", "vm", "debian"], dict(os.environ))
        monkeypatch.delenv(name)


def test_cache_ls_for_scripts(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    proc = kiln(["cache", "ls", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"store": str(tmp_path / "cache"), "entries": []}
    proc = kiln(["cache", "gc", "--max-size", "1G", "--json"], tmp_path)
    assert json.loads(proc.stdout) == {"removed": [], "freed": 0}, proc.stderr
    proc = kiln(["gc", "--json"], tmp_path)
    assert json.loads(proc.stdout) == {"reclaimed": []}, proc.stderr
