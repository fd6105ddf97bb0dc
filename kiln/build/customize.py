"""Running the plan's steps: the base bootstrap and every hook or package step as its own layer.

Each step mounts an overlay whose lower layers are the cached results of the steps before it and whose
upper directory becomes the step's own layer in the store. A step whose key is already in the store
costs nothing but a lookup; the first missing step and everything after it run.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kiln.build.elements import IN_CHROOT_PHASES, PHASES, tree_hash
from kiln.build.plan import HELPERS, BuildPlan, Step, digest
from kiln.host.arch import ensure_binfmt
from kiln.host.chroot import CHROOT_PATH, IN_TARGET, ChrootSession
from kiln.host.confine import confined_argv
from kiln.host.mounts import MountStack
from kiln.host.run import interactive, run, tracked
from kiln.host.state import state_dir
from kiln.model.errors import CommandError, HookError, SpecError
from kiln.sources import bootstrap as bootstrap_mod
from kiln.sources.extract import extract_rootfs
from kiln.sources.upstream import fetch_image
from kiln.store.entries import Store

log = logging.getLogger("kiln.customize")


HOOK_TIMEOUT = 3600.0
UNABLE_RE = re.compile(r"Unable to locate package (\S+)")
HOOKS_LAYER = "hooks"  # in a step's store entry: what the step wrote into TMP_HOOKS_PATH


@dataclass
class StepResult:
    label: str
    key: str
    cached: bool
    seconds: float


@dataclass
class PhaseResult:
    phase: str
    steps: list[StepResult] = field(default_factory=list)

    @property
    def cached(self) -> bool:
        return all(s.cached for s in self.steps)


@dataclass
class BuildContext:
    """Where one build works: its directory, the store, the shared package cache."""

    plan: BuildPlan
    store: Store
    workdir: Path
    rebuild: bool = False  # --no-cache: run every step, replacing what the store holds
    break_at: str | None = None  # DIB's break=: before-<phase>, after-<phase>, after-error

    @property
    def hooks_dir(self) -> Path:
        return self.workdir / "hooks"

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    @property
    def deb_cache(self) -> Path:
        return self.store.root / "debs" / f"{self.plan.spec.distro.value}-{self.plan.spec.arch.value}"

    @property
    def dib_cache(self) -> Path:
        return self.store.root / "dib-cache"


def _hooks_stamp(ctx: BuildContext) -> str:
    return digest([ctx.plan.env_key, [e.hash for e in ctx.plan.elements], tree_hash(HELPERS)])


def prepare_hooks_dir(ctx: BuildContext) -> Path:
    """TMP_HOOKS_PATH: every element's directories merged (hooks, environment.d, bin, data), plus kiln's
    helpers. Bound read-only at /tmp/in_target.d inside the chroot. Rebuilt when the elements change."""
    dest = ctx.hooks_dir
    stamp = ctx.workdir / "hooks.stamp"
    if dest.exists() and stamp.exists() and stamp.read_text() == _hooks_stamp(ctx):
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for info in ctx.plan.elements:
        for child in sorted(Path(info.path).iterdir()):
            if child.is_dir():
                shutil.copytree(child, dest / child.name, symlinks=True, dirs_exist_ok=True)
    (dest / "bin").mkdir(exist_ok=True)
    for helper in HELPERS.iterdir():
        if helper.is_file():
            shutil.copy2(helper, dest / "bin" / helper.name)
    shutil.copytree(HELPERS / "outside", dest / "outside-bin", dirs_exist_ok=True)
    stamp.write_text(_hooks_stamp(ctx))
    return dest


def _non_empty(path: Path) -> bool:
    return path.is_dir() and any(os.scandir(path))


def layer_keys(ctx: BuildContext, upto: int) -> list[str]:
    """The store keys of the layers under step `upto` (the base and the steps before it): what a build holds
    (`Store.holding`) while their overlay is mounted, so that no gc removes them under it."""
    return [ctx.plan.base_key, *(s.key for s in ctx.plan.steps[:upto])]


def layer_stack(ctx: BuildContext, upto: int) -> list[Path]:
    """Lower root layers for step `upto`: the non-empty results of the steps before it, top first."""
    layers = [ctx.store.data(ctx.plan.base_key)]
    layers += [ctx.store.data(s.key) for s in ctx.plan.steps[:upto] if _non_empty(ctx.store.data(s.key))]
    return list(reversed(layers))


def hooks_stack(ctx: BuildContext, upto: int) -> list[Path]:
    """What steps before `upto` wrote into TMP_HOOKS_PATH (extra-data.d does), top first, over the merged
    element directories."""
    layers = [ctx.store.path(s.key) / HOOKS_LAYER for s in ctx.plan.steps[:upto]]
    return [*reversed([p for p in layers if _non_empty(p)]), ctx.hooks_dir]


def ensure_base(ctx: BuildContext) -> StepResult:
    """The bootstrapped base tree, from the store or built now."""
    key = ctx.plan.base_key
    start = time.monotonic()
    req, pinned = ctx.plan.bootstrap, ctx.plan.upstream
    description = pinned.base.what if pinned else f"{req.distro} {req.release} {req.arch}"
    with ctx.store.step(key, kind="base", description=description, rebuild=ctx.rebuild,
                        extra={"upstream": pinned.manifest()} if pinned else None) as entry:
        if entry.cached:
            log.info("base %s %s: cached", ctx.plan.spec.distro.value, ctx.plan.spec.release)
            return StepResult("bootstrap", key, True, time.monotonic() - start)
        ensure_binfmt(req.arch)
        with tracked(ctx.workdir):
            if pinned is not None:
                image = fetch_image(pinned, ctx.store.root / "downloads")
                extract_rootfs(image.path, entry.data, workdir=ctx.workdir, format=pinned.base.format,
                               arch=pinned.base.arch)
            else:
                bootstrap_mod.bootstrap(req, entry.data, deb_cache=ctx.deb_cache)
    return StepResult("bootstrap", key, False, time.monotonic() - start)


def _secrets(ctx: BuildContext) -> dict[str, str]:
    return {k: v.get_secret_value() for k, v in ctx.plan.spec.secrets.items()}


def _chroot_env(ctx: BuildContext) -> dict[str, str]:
    own = {"PATH": CHROOT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TERM": "dumb",
           "DEBIAN_FRONTEND": "noninteractive", "TMP_HOOKS_PATH": IN_TARGET, "TMPDIR": "/tmp"}
    # kiln's own variables last: the spec cannot name them (ImageSpec refuses), and they win regardless
    return {**ctx.plan.env, **_secrets(ctx), **own}


def _outside_env(ctx: BuildContext, hooks: Path) -> dict[str, str]:
    tmp = ctx.workdir / "tmp"
    home = ctx.workdir / "home"
    tmp.mkdir(exist_ok=True)
    home.mkdir(exist_ok=True)
    ctx.dib_cache.mkdir(parents=True, exist_ok=True)
    own = {
        "PATH": f"{hooks}/outside-bin:{hooks}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(home), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TERM": "dumb",
        "TARGET_ROOT": str(ctx.root), "TMP_MOUNT_PATH": str(ctx.root), "TMP_HOOKS_PATH": str(hooks),
        "TMPDIR": str(tmp), "TMP_DIR": str(tmp),
    }
    # DIB_IMAGE_CACHE is DIB's option (`kiln dib --image-cache`): the spec's wins over kiln's default
    return {"DIB_IMAGE_CACHE": str(ctx.dib_cache), **ctx.plan.env, **_secrets(ctx), **own}


def _confined(ctx: BuildContext, argv: list[str]) -> list[str]:
    """Hooks outside the chroot run as root on the host: in a private mount namespace where everything but
    the build's own directories is read-only, kiln's state is hidden and /dev has no disk (kiln.host.confine)."""
    return confined_argv(ctx.hooks_dir / "outside-bin" / "kiln-confine", argv,
                         writable=[ctx.workdir, ctx.dib_cache], hidden=[state_dir()])


def _step_argv(step: Step, hooks: str) -> list[str]:
    if step.kind == "hook":
        return ["/bin/bash", f"{hooks}/bin/kiln-run-hook", step.phase, step.name]
    if step.kind == "packages":
        return ["/bin/bash", f"{hooks}/bin/install-packages", *step.packages]
    return ["/bin/bash", f"{hooks}/bin/install-packages", "-e", *step.packages]


def _run_step_in(ctx: BuildContext, step: Step, hooks: Path) -> None:
    try:
        if not step.in_chroot:
            run(_confined(ctx, _step_argv(step, str(hooks))), env=_outside_env(ctx, hooks), cwd=ctx.workdir,
                timeout=HOOK_TIMEOUT, what=step.label)
            return
        with ChrootSession(ctx.root, ctx.workdir, hooks_dir=hooks, apt_cache=ctx.deb_cache) as chroot:
            chroot.run(_step_argv(step, IN_TARGET), env=_chroot_env(ctx), timeout=HOOK_TIMEOUT, what=step.label)
    except CommandError as exc:
        if step.kind != "hook":
            raise PackageStepError(step, exc) from None
        raise HookError(element=step.element, phase=step.phase, hook=step.name, returncode=exc.returncode,
                        tail=exc.tail) from None


class PackageStepError(HookError):
    """A package install step failed: names the packages apt could not find and the elements that asked."""

    def __init__(self, step: Step, exc: CommandError) -> None:
        missing = sorted({m.group(1) for line in exc.tail for m in [UNABLE_RE.search(line)] if m})
        by_element: dict[str, list[str]] = {}
        for package, element in step.origins:
            if not missing or package in missing:
                by_element.setdefault(element, []).append(package)
        who = "; ".join(f"{e}: {' '.join(sorted(p))}" for e, p in sorted(by_element.items()))
        super().__init__(element=who or step.element, phase=step.phase, hook=step.name,
                         returncode=exc.returncode, tail=exc.tail)
        if missing:
            self.args = (f"package{'s' if len(missing) > 1 else ''} {', '.join(missing)} not available from the "
                         f"mirror (asked for by {who}); {step.phase}/{step.name} exited with {exc.returncode}"
                         + "\n  last output:\n" + "\n".join(f"    {line}" for line in exc.tail),)


def _mount_step(ctx: BuildContext, step: Step, mounts: MountStack, entry: Path) -> Path:
    """Mount the step's root (an overlay with the entry's upper) and its view of TMP_HOOKS_PATH.

    Hooks outside the chroot may write to TMP_HOOKS_PATH (DIB's extra-data.d does); those writes go to the
    entry's own hooks layer so that a later build that takes this step from the cache sees them too.
    """
    mounts.overlay(layer_stack(ctx, step.index), ctx.root, upper=entry / "data", work=entry / "work")
    hooks_lowers = hooks_stack(ctx, step.index)
    if not step.in_chroot:
        return mounts.overlay(hooks_lowers, ctx.workdir / "hooks-view", upper=entry / HOOKS_LAYER,
                              work=entry / "hooks-work")
    if len(hooks_lowers) > 1:
        return mounts.overlay(hooks_lowers, ctx.workdir / "hooks-view")
    return ctx.hooks_dir


BREAK_POINTS = frozenset(
    [f"{when}-{phase.removesuffix('.d')}" for phase in PHASES for when in ("before", "after")] + ["after-error"])


def check_break(value: str | None) -> str | None:
    if value is not None and value not in BREAK_POINTS:
        raise SpecError(f"--break {value}: unknown break point; use before-<phase>, after-<phase> or after-error "
                        f"(phases: {', '.join(p.removesuffix('.d') for p in PHASES)})")
    return value


def debug_shell(ctx: BuildContext, *, upto: int, in_chroot: bool, why: str) -> None:
    """An interactive shell on the tree as it is before step `upto` (changes go to a scratch layer and are
    discarded, so they never reach the cache)."""
    scratch = ctx.workdir / "break"
    with ctx.store.holding(layer_keys(ctx, upto)), MountStack(ctx.workdir) as mounts:
        mounts.overlay(layer_stack(ctx, upto), ctx.root, upper=scratch / "upper", work=scratch / "work")
        _shell_on_mounted_root(ctx, in_chroot=in_chroot, why=why)
    shutil.rmtree(scratch, ignore_errors=True)


def _shell_on_mounted_root(ctx: BuildContext, *, in_chroot: bool, why: str) -> None:
    if in_chroot:
        with ChrootSession(ctx.root, ctx.workdir, hooks_dir=ctx.hooks_dir, apt_cache=ctx.deb_cache):
            env = {**_chroot_env(ctx), "TERM": os.environ.get("TERM", "xterm"), "PS1": f"kiln({why})# "}
            interactive(["chroot", str(ctx.root), "/bin/bash", "--norc", "-i"], env=env, what=why)
    else:
        env = {**_outside_env(ctx, ctx.hooks_dir), "TERM": os.environ.get("TERM", "xterm"), "PS1": f"kiln({why})$ "}
        interactive(["/bin/bash", "--norc", "-i"], env=env, what=why)


def run_step(ctx: BuildContext, step: Step) -> StepResult:
    start = time.monotonic()
    with ctx.store.step(step.key, kind="layer", description=step.label, rebuild=ctx.rebuild, keep=(HOOKS_LAYER,),
                        extra={"phase": step.phase, "hook": step.name, "element": step.element}) as entry:
        if entry.cached:
            return StepResult(step.label, step.key, True, time.monotonic() - start)
        log.info("running %s", step.label)
        assert entry.scratch is not None
        with ctx.store.holding(layer_keys(ctx, step.index)), MountStack(ctx.workdir) as mounts:
            hooks = _mount_step(ctx, step, mounts, entry.scratch)
            try:
                _run_step_in(ctx, step, hooks)
            except HookError:
                if ctx.break_at == "after-error":
                    _shell_on_mounted_root(ctx, in_chroot=step.in_chroot, why=f"after-error in {step.label}")
                raise
            mounts.unmount_all()
    seconds = time.monotonic() - start
    log.info("finished %s in %.1f s", step.label, seconds)
    return StepResult(step.label, step.key, False, seconds)


def run_phase(ctx: BuildContext, phase: str, on_step: Callable[[StepResult], None] | None = None) -> PhaseResult:
    ensure_binfmt(ctx.plan.spec.arch.value)
    with tracked(ctx.workdir):
        return _run_phase(ctx, phase, on_step)


def _run_phase(ctx: BuildContext, phase: str, on_step: Callable[[StepResult], None] | None) -> PhaseResult:
    result = PhaseResult(phase)
    prepare_hooks_dir(ctx)
    steps = ctx.plan.phase_steps(phase)
    name = phase.removesuffix(".d")
    if steps and ctx.break_at == f"before-{name}":
        debug_shell(ctx, upto=steps[0].index, in_chroot=phase in IN_CHROOT_PHASES, why=f"before-{name}")
    for step in steps:
        r = run_step(ctx, step)
        result.steps.append(r)
        if on_step:
            on_step(r)
    if steps and ctx.break_at == f"after-{name}":
        debug_shell(ctx, upto=steps[-1].index + 1, in_chroot=phase in IN_CHROOT_PHASES, why=f"after-{name}")
    return result
