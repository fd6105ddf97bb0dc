"""The build matrix: a file of image specs as axes (distro x release x arch) over one base spec.

A matrix file (`images/nightly.yaml`)::

    name: nightly
    base:                        # an image spec without the axis fields; every cell starts from it
      elements: [vm, cloud-init]
    axes:                        # each axis: its values, each with the spec fields only its cells get
      release:
        bookworm:
        trixie:
      arch:
        amd64:
        arm64: {boot_test: {firmware: [uefi]}}
    exclude:                     # cells not to build
      - {release: trixie, arch: arm64}

Cells are the product of the axes in file order, named by `cell_name` (default
`{distro}-{release}-{arch}`); that name is also the image's name and its output directory. An axis
value's fields are merged like command-line flags (`kiln.model.spec.merge_overrides`: `add_elements` and
`add_packages` append, `env`, `secrets` and `boot_test` merge, the rest replace). Every error names the
file and the field, and every cell is validated as an `ImageSpec` before anything is built.

Also here, because they are plain computations the flows share: which cells `--only` selects, how many
of a host's slots (CPU, disk, KVM) a cell occupies, and the Markdown table of a matrix run's results.
This module imports no Prefect.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
from collections.abc import Iterable, Mapping, Sequence
from itertools import product
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kiln.model.errors import SpecError
from kiln.model.pkgdiff import diff_from_dict
from kiln.model.spec import ImageSpec, merge_overrides, read_spec_file, spec_from_dict

AXES = ("distro", "release", "arch")
Axis = Literal["distro", "release", "arch"]
DEFAULT_CELL_NAME = "{distro}-{release}-{arch}"
# keys an axis value may set besides the spec's own fields (appended, as the -e/-p flags do)
APPEND_KEYS = ("add_elements", "add_packages")
GIB = 1024**3


class MatrixError(SpecError):
    """A matrix file, or a selection of its cells, is invalid; the message names the file and field."""


def _spec_fields() -> set[str]:
    return set(ImageSpec.model_fields)


class MatrixFile(BaseModel):
    """The validated content of a matrix file (cells come from `expand`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="matrix", description="the matrix's name (run names, artifact keys)")
    description: str = ""
    cell_name: str = Field(default=DEFAULT_CELL_NAME, description="template of a cell's (and its image's) name")
    base: dict[str, Any] = Field(default_factory=dict, description="the image spec every cell starts from")
    axes: dict[Axis, dict[str, dict[str, Any]]] = Field(min_length=1)
    exclude: list[dict[Axis, str]] = Field(default_factory=list)
    publish: dict[str, Any] | None = Field(default=None, description="the `publish:` section every cell's spec "
                                           "gets (its image name is the cell's name); the nightly refresh "
                                           "publishes what changed there")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(r"^[a-z0-9][a-z0-9-]*$", v):
            raise ValueError(f"matrix name {v!r} may only contain lower-case letters, digits and '-'")
        return v

    @field_validator("base")
    @classmethod
    def _base(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - _spec_fields())
        if unknown:
            raise ValueError(f"unknown spec field {unknown[0]!r}")
        if "name" in v:
            raise ValueError("'name' is set per cell: use the matrix's 'cell_name' template")
        return v

    @field_validator("axes", mode="before")
    @classmethod
    def _axes_values(cls, v: Any) -> Any:
        """`release: [bookworm, trixie]` is short for `release: {bookworm: {}, trixie: {}}`."""
        if not isinstance(v, dict):
            return v
        out: dict[Any, Any] = {}
        for axis, values in v.items():
            if isinstance(values, list):
                values = {str(x): {} for x in values}
            if isinstance(values, dict):
                values = {str(k): ({} if val is None else val) for k, val in values.items()}
            out[axis] = values
        return out

    @field_validator("axes")
    @classmethod
    def _axes(cls, v: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
        allowed = (_spec_fields() | set(APPEND_KEYS)) - {"name", *AXES}
        for axis, values in v.items():
            if not values:
                raise ValueError(f"axis {axis!r} has no values")
            for value, fields in values.items():
                unknown = sorted(set(fields) - allowed)
                if unknown:
                    raise ValueError(f"{axis}={value}: field {unknown[0]!r} is not a spec field an axis value may set")
        return v

    @model_validator(mode="after")
    def _template_and_excludes(self) -> MatrixFile:
        if self.publish is not None and "publish" in self.base:
            raise ValueError("publish is set twice: at the top of the matrix and in base; keep one")
        both = sorted(set(self.base) & set(self.axes))
        if both:
            raise ValueError(f"base.{both[0]}: {both[0]!r} is an axis of this matrix; set it under 'axes' only")
        for name in re.findall(r"{([^}]*)}", self.cell_name):
            if name not in AXES:
                raise ValueError(f"cell_name {self.cell_name!r}: {{{name}}} is not one of {', '.join(AXES)}")
        for i, rule in enumerate(self.exclude):
            for axis, value in rule.items():
                if axis not in self.axes:
                    raise ValueError(f"exclude[{i}]: {axis!r} is not an axis of this matrix")
                if value not in self.axes[axis]:
                    raise ValueError(f"exclude[{i}]: {axis}={value} is not a value of axis {axis!r}")
        return self


class Cell(BaseModel):
    """One image of the matrix: its axis values and its complete, validated spec."""

    model_config = ConfigDict(frozen=True)

    name: str
    axes: dict[str, str]
    spec: ImageSpec

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.axes.items())


def _errors(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p != "[key]") or "(top level)"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        parts.append(f"{source}: field '{loc}': {msg}")
    return "\n".join(parts)


def parse_matrix(data: Mapping[str, Any], source: str) -> MatrixFile:
    try:
        return MatrixFile.model_validate(dict(data))
    except ValidationError as exc:
        raise MatrixError(_errors(exc, source)) from None


def load_matrix(path: Path) -> MatrixFile:
    """Read and validate a matrix file; errors name the file (and line, for YAML) and the field."""
    try:
        data = read_spec_file(path)
    except SpecError as exc:
        raise MatrixError(str(exc).replace("a spec must be", "a matrix must be")) from None
    return parse_matrix(data, str(path))


def expand(matrix: MatrixFile, source: str = "matrix") -> list[Cell]:
    """Every cell of the matrix (minus the excluded ones), in axis order, each spec validated."""
    axes = list(matrix.axes.items())
    cells: list[Cell] = []
    seen: dict[str, str] = {}
    for combo in product(*[list(values.items()) for _, values in axes]):
        chosen: dict[str, str] = {axis: value for (axis, _), (value, _) in zip(axes, combo, strict=True)}
        if any(all(chosen.get(a) == v for a, v in rule.items()) for rule in matrix.exclude):
            continue
        base = dict(matrix.base)
        if matrix.publish is not None:
            base["publish"] = matrix.publish
        data = merge_overrides(base, dict(chosen))
        for _value, fields in combo:
            data = merge_overrides(data, fields)
        label = ", ".join(f"{k}={v}" for k, v in chosen.items())
        try:
            partial = spec_from_dict(data, f"{source} (cell {label})")  # validates axis values and fields
            name = matrix.cell_name.format(distro=partial.distro.value, release=partial.release,
                                           arch=partial.arch.value)
            spec = spec_from_dict({**data, "name": name}, f"{source} (cell {label}, cell_name)")
        except SpecError as exc:
            raise MatrixError(str(exc)) from None
        if name in seen:
            raise MatrixError(f"{source}: field 'cell_name': cells {seen[name]} and {label} are both named {name!r}; "
                              "put every axis in the template")
        seen[name] = label
        cells.append(Cell(name=name, axes=chosen, spec=spec))
    if not cells:
        raise MatrixError(f"{source}: field 'exclude': every cell is excluded")
    return cells


def load_cells(path: Path) -> tuple[MatrixFile, list[Cell]]:
    matrix = load_matrix(path)
    return matrix, expand(matrix, str(path))


def parse_only(filters: Iterable[str]) -> dict[str, set[str]]:
    """`["arch=amd64,release=trixie", "arch=arm64"]` -> {"arch": {"amd64", "arm64"}, "release": {"trixie"}}.

    Values of one axis are alternatives; different axes must all match."""
    wanted: dict[str, set[str]] = {}
    for text in filters:
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            axis, sep, value = part.partition("=")
            if not sep or not axis.strip() or not value.strip():
                raise MatrixError(f"--only {text!r}: use AXIS=VALUE[,AXIS=VALUE…], e.g. arch=amd64,release=trixie")
            wanted.setdefault(axis.strip(), set()).add(value.strip())
    return wanted


def select(cells: Sequence[Cell], filters: Iterable[str], source: str = "matrix") -> list[Cell]:
    """The cells `--only` selects; an unknown axis or value, or an empty selection, is an error."""
    wanted = parse_only(filters)
    if not wanted:
        return list(cells)
    known: dict[str, list[str]] = {}
    for cell in cells:
        for axis, value in cell.axes.items():
            if value not in known.setdefault(axis, []):
                known[axis].append(value)
    for axis, values in wanted.items():
        if axis not in known:
            raise MatrixError(f"--only {axis}=…: {source} has no axis {axis!r} (axes: {', '.join(known)})")
        for value in sorted(values - set(known[axis])):
            raise MatrixError(f"--only {axis}={value}: not a value of axis {axis!r} in {source} "
                              f"(values: {', '.join(known[axis])})")
    chosen = [c for c in cells if all(c.axes.get(a) in vs for a, vs in wanted.items())]
    if not chosen:
        text = ",".join(f"{a}={v}" for a, vs in wanted.items() for v in sorted(vs))
        raise MatrixError(f"--only {text}: selects no cell of {source} (the others are excluded)")
    return chosen


# ----------------------------------------------------------------------------------------- host slots

SLOT_KINDS = ("cpu", "disk", "kvm")
LIMITS_ENV = "KILN_HOST_LIMITS"  # e.g. "cpu=2,disk=40,kvm=1": the limits kiln creates when they are missing


def host_name() -> str:
    """This build host's name in limit names: `KILN_HOST` or the short hostname."""
    name = os.environ.get("KILN_HOST") or socket.gethostname().split(".")[0] or "localhost"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def limit_name(kind: str, host: str | None = None) -> str:
    """The Prefect global concurrency limit of `kind` slots on `host`: `kiln-<host>-<kind>`."""
    if kind not in SLOT_KINDS:
        raise ValueError(kind)
    return f"kiln-{host or host_name()}-{kind}"


def default_limits(store_root: Path, env: Mapping[str, str] | None = None) -> dict[str, int]:
    """The size of each of this host's limits, for when kiln has to create them.

    cpu: one slot per core (a build is mostly one busy process at a time: apt, mkfs, qemu-img).
    disk: GiB free where builds write (the store), less a 10 % reserve.
    kvm: one boot test per two cores (a TCG guest with 2 vCPUs keeps two cores busy).
    `KILN_HOST_LIMITS=cpu=N,disk=N,kvm=N` overrides any of them.
    """
    env = os.environ if env is None else env
    cores = os.cpu_count() or 1
    probe = store_root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free_gib = shutil.disk_usage(probe).free // GIB
    limits = {"cpu": cores, "disk": max(1, int(free_gib * 0.9)), "kvm": max(1, cores // 2)}
    for part in (p.strip() for p in env.get(LIMITS_ENV, "").split(",")):
        if not part:
            continue
        kind, _, value = part.partition("=")
        if kind not in SLOT_KINDS or not value.isdigit():
            raise SpecError(f"{LIMITS_ENV}: {part!r} is not one of cpu=N, disk=N, kvm=N")
        limits[kind] = int(value)
    return limits


def cell_demand(spec: ImageSpec, *, boot_test: bool) -> dict[str, int]:
    """The slots one build of `spec` holds on its host while it runs.

    disk: the raw disk plus one converted copy per format, each counted at half the disk size (raw disks
    are sparse, a fresh image is mostly empty), and 2 GiB for the tree and layers.
    kvm: one slot while the build may boot a VM.
    """
    # raw disks are sparse and an image holds the tree once: half the disk size per file is a safe bound
    half = math.ceil(spec.size / GIB / 2)
    demand = {"cpu": 1, "disk": half * (1 + len(spec.formats)) + 2}
    if boot_test and spec.boot_test.enabled:
        demand["kvm"] = 1
    return demand


# ----------------------------------------------------------------------------------------- results

CellStatus = Literal["built", "failed", "cancelled", "crashed"]


class CellResult(BaseModel):
    """What became of one cell: for the summary table, the flow's return value and the publishing hook."""

    name: str
    axes: dict[str, str]
    status: CellStatus
    seconds: float = 0.0
    output: str = ""
    images: list[str] = Field(default_factory=list)
    manifest: str | None = None
    boot_test: list[dict[str, Any]] = Field(default_factory=list)
    error: str | None = None
    flow_run_id: str | None = None
    flow_run_name: str | None = None
    worker: str | None = None
    published: dict[str, Any] | None = None  # the publish step's report (status published or unchanged)

    @property
    def ok(self) -> bool:
        return self.status == "built"

    @property
    def publish_status(self) -> str:
        """published, unchanged, or - (not published: no targets, or the cell failed first)."""
        return str((self.published or {}).get("status") or "-")


def _cell_text(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def publish_text(r: CellResult) -> str:
    """What the publish step did for a cell, in one line (its package diff summary when it published)."""
    p = r.published or {}
    if p.get("status") == "unchanged":
        return "unchanged"
    if p.get("status") == "published":
        diff = (p.get("diff") or {}).get("summary")
        return f"published ({diff} since {p['replaces']})" if diff and p.get("replaces") else "published"
    return "-"


def summary_table(matrix_name: str, results: Sequence[CellResult], *, ui_url: str | None = None) -> str:
    """The Markdown summary of a matrix run: one row per cell, then the first lines of every failure."""
    built = sum(r.ok for r in results)
    axes = list(results[0].axes) if results else []
    lines = [f"# Matrix {matrix_name}: {built} of {len(results)} cells built", ""]
    publishing = any(r.published for r in results)
    lines.append("| cell | " + " | ".join(axes) + " | result | seconds | images | boot test | run |"
                 + (" published |" if publishing else ""))
    lines.append("|---|" + "---|" * len(axes) + "---|---:|---|---|---|" + ("---|" if publishing else ""))
    for r in results:
        boots = ", ".join(f"{b.get('firmware')} {'passed' if b.get('passed') else 'FAILED'}" for b in r.boot_test)
        images = ", ".join(Path(p).name for p in r.images)
        run = r.flow_run_name or (r.flow_run_id or "")[:8]
        if ui_url and r.flow_run_id:
            run = f"[{run}]({ui_url.rstrip('/')}/runs/flow-run/{r.flow_run_id})"
        if r.worker:
            run += f" on {r.worker}"
        result = {"built": "built", "failed": "**FAILED**", "cancelled": "cancelled", "crashed": "**CRASHED**"}
        lines.append(f"| {r.name} | " + " | ".join(r.axes.get(a, "") for a in axes)
                     + f" | {result[r.status]} | {r.seconds:.0f} | {images or '-'} | {boots or 'skipped'} | {run} |"
                     + (f" {_cell_text(publish_text(r))} |" if publishing else ""))
    changes = [r for r in results if (r.published or {}).get("diff")]
    if changes:
        lines += ["", "## Package changes", ""]
        for r in changes:
            diff = diff_from_dict((r.published or {})["diff"])
            lines.append(f"- **{r.name}** (since {(r.published or {}).get('replaces')}): {diff.summary()}")
            lines += [f"  - `{_cell_text(line.strip())}`" for line in diff.lines()]
    failures = [r for r in results if not r.ok]
    if failures:
        lines += ["", "## Failures", ""]
        for r in failures:
            first = (r.error or r.status).strip().splitlines()
            lines.append(f"- **{r.name}**: {_cell_text(first[0] if first else r.status)}")
    return "\n".join(lines) + "\n"
