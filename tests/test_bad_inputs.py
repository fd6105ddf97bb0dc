"""Every bad input: an error naming what is wrong, a non-zero exit code and no traceback.

docs/bad-inputs.md lists the same cases with the messages kiln prints."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.e2e import REPO, kiln_env

BAD = "tests/data/bad-elements"
CASES = [
    ("unknown field", ["build", "tests/data/bad-unknown-field.yaml"], "field 'elemnts': unknown field"),
    ("malformed YAML", ["build", "tests/data/bad-malformed.yaml"], "bad-malformed.yaml:3:1: malformed YAML"),
    ("missing spec file", ["build", "tests/data/nope.yaml"], "nope.yaml: cannot read spec"),
    ("unknown element", ["build", "-e", "no-such-element"], "element 'no-such-element' (asked for by the image spec)"),
    ("element-deps pointing nowhere", ["build", "-e", "deps-nowhere", "--elements-path", BAD],
     "element 'ghost-element' (asked for by element 'deps-nowhere' (element-deps)) not found"),
    ("element name escaping", ["build", "-e", "../etc"], "field 'elements': element name '../etc' may only contain"),
    ("image name escaping", ["build", "--name", "../../evil"], "field 'name': image name '../../evil'"),
    ("elements path that is not a directory", ["build", "--elements-path", "/nonexistent/dir"],
     "element path '/nonexistent/dir' is not a directory"),
    ("unsupported arch", ["build", "--arch", "sparc"], "field 'arch': Input should be 'amd64' or 'arm64'"),
    ("size not a size", ["build", "--size", "big"], "field 'size': not a size: 'big'"),
    ("size too small", ["build", "--size", "100M"], "field 'size': 104857600 bytes is too small"),
    ("unknown format", ["build", "--format", "tgz"], "field 'formats.0': Input should be"),
    ("unreadable hook (dangling symlink)", ["build", "-e", "dangling", "--elements-path", BAD],
     "element 'dangling': hook install.d/50-dangling is a dangling symlink"),
    ("two elements, one hook name", ["build", "-e", "dup-a", "-e", "dup-b", "--elements-path", BAD],
     "hook install.d/50-same is shipped by both 'dup-a' and 'dup-b'"),
    ("malformed package-installs", ["build", "-e", "bad-pkgs", "--elements-path", BAD],
     "element 'bad-pkgs': package 'x' has phase 'nowhere.d'"),
    ("mirror that does not answer", ["build", "--mirror", "http://127.0.0.1:9/debian"],
     "mirror http://127.0.0.1:9/debian does not answer for release 'bookworm'"),
    ("a misspelt release", ["build", "--release", "bookwrm"], "is 'bookwrm' misspelt? releases kiln knows: bookworm"),
    ("a matrix file given to build", ["build", "images/nightly.yaml"],
     "this is a matrix file (it has axes: release, arch), not an image spec: build it with `kiln matrix"),
    ("mirror that is not a URL", ["build", "--mirror", "ftp:/x"], "field 'mirror': mirror 'ftp:/x' must be"),
    ("unknown break point", ["build", "--break", "before-lunch"], "--break before-lunch: unknown break point"),
    ("secret variable not set", ["build", "--secret", "KILN_NO_SUCH_SECRET"],
     "--secret KILN_NO_SUCH_SECRET: the environment variable KILN_NO_SUCH_SECRET is not set"),
    ("bad --env", ["build", "--env", "NOEQUALS"], "--env takes NAME=VALUE"),
    ("DIB line: unsupported option", ["dib", "--mkfs-options", "x", "vm", "debian"],
     "--mkfs-options is not supported by kiln"),
    ("DIB line: no distro element", ["dib", "vm"], "no distribution element among vm"),
    ("an element name of 5000 characters", ["build", "-e", "x" * 5000], "(5000 characters)' may only contain"),
    ("a waiver without a reason", ["build", "tests/data/bad-waiver.yaml"], "the waiver of 'time-sync' needs a reason"),
    ("a hook variable that changes what runs", ["build", "--env", "PATH=root/usr/bin"],
     "field 'env': PATH: kiln sets this variable for the hooks"),
    ("compression kiln does not know", ["build", "--compression", "lz4"], "argument --compression: invalid choice"),
]


DOC = REPO / "docs" / "bad-inputs.md"
BEGIN, END = "<!-- bad-inputs:begin -->", "<!-- bad-inputs:end -->"
PREFIX = "kiln: error: "


def run_case(args: list[str]) -> tuple[int, str, str]:
    """(exit code, the error line without its prefix, all of stderr) of `kiln ARGS`."""
    env = {**kiln_env(), "KILN_CACHE": "/nonexistent-kiln-cache-must-not-be-created"}
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", *args, "--no-boot-test"] if args[0] == "build"
                          else [sys.executable, "-m", "kiln.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith(PREFIX)]
    return proc.returncode, errors[-1].removeprefix(PREFIX) if errors else "", proc.stderr


def row(case: str, args: list[str], code: int, message: str) -> str:
    # the host's own mirror is read from its apt sources; the doc names no mirror's host
    message = re.sub(r"mirror https?://(?!127\.0\.0\.1)\S+", "mirror <the host's mirror>", message)
    message = message.replace(f"{REPO}/", "")  # paths in the checkout, wherever it is
    shown = " ".join(a if len(a) <= 40 else f"{a[:12]}…({len(a)} characters)" for a in args)
    return f"| {case} | `kiln {shown}` | {code} | {message.replace('|', '&#124;')} |"


def documented() -> dict[str, str]:
    text = DOC.read_text()
    table = text[text.index(BEGIN) + len(BEGIN):text.index(END)]
    return {line.split(" | ")[0].removeprefix("| "): line for line in table.strip().splitlines()[2:]}


@pytest.mark.parametrize("case,args,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_error(case: str, args: list[str], message: str) -> None:
    code, line, stderr = run_case(args)
    assert code == 2, stderr  # bad input, as kiln --help documents it
    assert message in line, stderr
    assert "Traceback" not in stderr
    # docs/bad-inputs.md shows this very line and exit code: a changed message fails here until the doc is
    # regenerated (python -m tests.test_bad_inputs --write)
    assert documented().get(case) == row(case, args, code, line), "docs/bad-inputs.md is stale: regenerate it"


def write_doc() -> None:
    rows = [row(case, args, *run_case(args)[:2]) for case, args, _ in CASES]
    text = DOC.read_text()
    head, tail = text[:text.index(BEGIN) + len(BEGIN)], text[text.index(END):]
    table = "\n".join(["| bad input | command | exit | message |", "|---|---|---:|---|", *rows])
    DOC.write_text(f"{head}\n{table}\n{tail}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_doc()
