"""Running the plan's steps: the base bootstrap and every hook or package step as its own layer.

Each step mounts an overlay whose lower layers are the cached results of the steps before it and whose
upper directory becomes the step's own layer in the store. A step whose key is already in the store
costs nothing but a lookup; the first missing step and everything after it run.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kiln import bootstrap as bootstrap_mod
from kiln.chroot import CHROOT_PATH, IN_TARGET, ChrootSession
from kiln.elements import tree_hash
from kiln.errors import CommandError, HookError
from kiln.mounts import MountStack
from kiln.plan import HELPERS, BuildPlan, Step, digest
from kiln.run import run
from kiln.store import Store

log = logging.getLogger("kiln.customize")


HOOK_TIMEOUT = 3600.0


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


def layer_stack(ctx: BuildContext, upto: int) -> list[Path]:
    """Lower layers for step `upto`: the non-empty results of the steps before it, top first."""
    keys = [ctx.plan.base_key] + [s.key for s in ctx.plan.steps[:upto]]
    layers = []
    for key in keys:
        data = ctx.store.data(key)
        if key == ctx.plan.base_key or any(os.scandir(data)):
            layers.append(data)
    return list(reversed(layers))


def ensure_base(ctx: BuildContext) -> StepResult:
    """The bootstrapped base tree, from the store or built now."""
    key = ctx.plan.base_key
    start = time.monotonic()
    with ctx.store.lock(key):
        if ctx.store.has(key) and not ctx.rebuild:
            ctx.store.touch(key)
            log.info("base %s %s: cached", ctx.plan.spec.distro.value, ctx.plan.spec.release)
            return StepResult("bootstrap", key, True, time.monotonic() - start)
        req = ctx.plan.bootstrap
        with ctx.store.new_entry(key, kind="base", description=f"{req.distro} {req.release} {req.arch}") as tmp:
            bootstrap_mod.bootstrap(req, tmp / "data", deb_cache=ctx.deb_cache)
    return StepResult("bootstrap", key, False, time.monotonic() - start)


def _chroot_env(ctx: BuildContext) -> dict[str, str]:
    env = {"PATH": CHROOT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TERM": "dumb",
           "DEBIAN_FRONTEND": "noninteractive", "TMP_HOOKS_PATH": IN_TARGET, "TMPDIR": "/tmp"}
    env.update(ctx.plan.env)
    return env


def _outside_env(ctx: BuildContext) -> dict[str, str]:
    tmp = ctx.workdir / "tmp"
    home = ctx.workdir / "home"
    tmp.mkdir(exist_ok=True)
    home.mkdir(exist_ok=True)
    ctx.dib_cache.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": f"{ctx.hooks_dir}/outside-bin:{ctx.hooks_dir}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                "/usr/bin:/sbin:/bin",
        "HOME": str(home), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TERM": "dumb",
        "TARGET_ROOT": str(ctx.root), "TMP_MOUNT_PATH": str(ctx.root), "TMP_HOOKS_PATH": str(ctx.hooks_dir),
        "TMPDIR": str(tmp), "TMP_DIR": str(tmp), "DIB_IMAGE_CACHE": str(ctx.dib_cache),
    }
    env.update(ctx.plan.env)
    return env


def _run_step_in(ctx: BuildContext, step: Step) -> None:
    try:
        if step.kind == "hook" and not step.in_chroot:
            run(["bash", str(ctx.hooks_dir / "bin" / "kiln-run-hook"), step.phase, step.name],
                env=_outside_env(ctx), cwd=ctx.workdir, timeout=HOOK_TIMEOUT, what=step.label)
            return
        with ChrootSession(ctx.root, ctx.workdir, hooks_dir=ctx.hooks_dir, apt_cache=ctx.deb_cache) as chroot:
            if step.kind == "hook":
                argv = ["/bin/bash", f"{IN_TARGET}/bin/kiln-run-hook", step.phase, step.name]
            elif step.kind == "packages":
                argv = ["/bin/bash", f"{IN_TARGET}/bin/install-packages", *step.packages]
            else:
                argv = ["/bin/bash", f"{IN_TARGET}/bin/install-packages", "-e", *step.packages]
            chroot.run(argv, env=_chroot_env(ctx), timeout=HOOK_TIMEOUT, what=step.label)
    except CommandError as exc:
        raise HookError(element=step.element, phase=step.phase, hook=step.name, returncode=exc.returncode,
                        tail=exc.tail) from None


def run_step(ctx: BuildContext, step: Step) -> StepResult:
    start = time.monotonic()
    with ctx.store.lock(step.key):
        if ctx.store.has(step.key) and not ctx.rebuild:
            ctx.store.touch(step.key)
            return StepResult(step.label, step.key, True, time.monotonic() - start)
        log.info("running %s", step.label)
        lowers = layer_stack(ctx, step.index)
        with ctx.store.new_entry(step.key, kind="layer", description=step.label,
                                 extra={"phase": step.phase, "hook": step.name, "element": step.element}) as tmp, \
                MountStack(ctx.workdir) as mounts:
            mounts.overlay(lowers, ctx.root, upper=tmp / "data", work=tmp / "work")
            _run_step_in(ctx, step)
            mounts.unmount_all()
    seconds = time.monotonic() - start
    log.info("finished %s in %.1f s", step.label, seconds)
    return StepResult(step.label, step.key, False, seconds)


def run_phase(ctx: BuildContext, phase: str, on_step: Callable[[StepResult], None] | None = None) -> PhaseResult:
    result = PhaseResult(phase)
    prepare_hooks_dir(ctx)
    for step in ctx.plan.phase_steps(phase):
        r = run_step(ctx, step)
        result.steps.append(r)
        if on_step:
            on_step(r)
    return result
