"""The README tells the truth about what the code has: every shipped element, every output format and every
environment variable kiln reads are named there (issue 19, item 7)."""

from __future__ import annotations

import ast
import re

from kiln.model.spec import ImageFormat
from tests.e2e import REPO

README = (REPO / "README.md").read_text()


def test_every_shipped_element_is_named() -> None:
    shipped = README[README.index("Shipped:"):README.index("Each has a README.")]
    for element in sorted(p.name for p in (REPO / "elements").iterdir() if p.is_dir()):
        assert f"`{element}`" in shipped, element
        assert (REPO / "elements" / element / "README.md").is_file() or (REPO / "elements" / element / "README.rst") \
            .is_file(), f"{element} has no README"


def test_every_format_is_named() -> None:
    line = next(line for line in README.splitlines() if line.startswith("formats: "))
    assert re.findall(r"\b[a-z0-9]+\b", line.split("#", 1)[1]) == [f.value for f in ImageFormat]


def test_every_environment_variable_the_code_reads_is_documented() -> None:
    names = set()
    for path in [*(REPO / "kiln").rglob("*.py"), *(REPO / "flows").rglob("*.py"), *(REPO / "tasks").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    re.fullmatch(r"KILN_[A-Z_]+", node.value):
                names.add(node.value)
    section = README[README.index("## Environment"):README.index("## Layout")]
    assert names and not [n for n in sorted(names) if f"`{n}`" not in section]


CONFORMANCE = REPO / "docs" / "conformance.md"
_TABLE_START = "| check | asserts |\n|---|---|\n"
_TABLE_END = "<!-- end of generated table -->"


def conformance_doc() -> str:
    """docs/conformance.md with its table of checks generated from kiln.model.checks.BUILTIN."""
    from kiln.model.checks import BUILTIN

    text = CONFORMANCE.read_text()
    head, rest = text.split(_TABLE_START, 1)
    rows = "".join(f"| `{name}` | {what.replace('|', '/')} |\n" for name, what in BUILTIN.items())
    return head + _TABLE_START + rows + _TABLE_END + rest.split(_TABLE_END, 1)[1]


def test_the_conformance_checks_are_documented() -> None:
    assert CONFORMANCE.read_text() == conformance_doc(), "stale: python -m tests.test_docs --write"


def test_every_distribution_element_kiln_dib_takes_is_documented() -> None:
    from kiln.cli.dib import DISTRO_ELEMENTS

    doc = (REPO / "docs" / "dib-compatibility.md").read_text()
    assert not [name for name in DISTRO_ELEMENTS if f"`{name}`" not in doc]


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write"]:
        CONFORMANCE.write_text(conformance_doc())
