"""The build plan: resolved elements, the environment hooks see, and every step with its content key.

A step's key hashes everything the step reads: its parent's key, the environment every hook sources
(element environment.d files, DIB variables, the spec's env), and the step's own input (the bytes
and modes of its element's files, or its package list). Paths that differ from build to build
(work directories, mount points) are not part of any key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shlex
import tempfile
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from kiln.build import elements, packages
from kiln.build.elements import ElementCheck
from kiln.build.secrets import dib_secrets, secret_digest
from kiln.host.run import redact_value
from kiln.model import facts
from kiln.model.checks import BUILTIN, check_waivers
from kiln.model.errors import ElementError, SpecError
from kiln.model.spec import ImageSpec
from kiln.model.urls import credentials_of, without_credentials
from kiln.sources import bootstrap, suites
from kiln.sources.epoch import release_epoch
from kiln.sources.mirror import resolve_mirror, resolve_security_mirror
from kiln.sources.suites import suite_digest
from kiln.sources.upstream import PinnedBase, base_key_fields, pin_base, resolve_base

log = logging.getLogger("kiln.plan")

HELPERS = Path(__file__).resolve().parent.parent / "helpers"
LAYER_FORMAT = "1"  # bump when the way steps are run changes what they produce
PACKAGE_STEP = "01-package-installs"
UNINSTALL_STEP = "99-package-uninstalls"
IMAGE_PACKAGES_STEP = "zz-image-packages"
KILN_OWNER = "kiln"
# environment names from the host that reach hooks: the DIB_* family, as diskimage-builder does
HOST_ENV_PREFIXES = ("DIB_",)
# resolved into the plan's mirrors instead
HOST_ENV_SKIP = {"DIB_DISTRIBUTION_MIRROR", "DIB_DEBIAN_SECURITY_MIRROR"}


def digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Step:
    index: int
    phase: str
    name: str
    element: str
    kind: str  # "hook", "packages", "uninstall"
    key: str
    packages: tuple[str, ...] = ()
    origins: tuple[tuple[str, str], ...] = ()  # (package, element that asked for it), for error messages

    @property
    def in_chroot(self) -> bool:
        return self.kind != "hook" or self.phase in elements.IN_CHROOT_PHASES

    @property
    def label(self) -> str:
        return f"{self.phase}/{self.name} ({self.element})"


@dataclass(frozen=True)
class ElementInfo:
    name: str
    path: str
    hash: str
    origin: str = "kiln"  # kiln, diskimage-builder or user (elements.Element.origin)


@dataclass
class BuildPlan:
    spec: ImageSpec
    mirror: str
    search_path: list[str]
    elements: list[ElementInfo]
    env: dict[str, str]
    env_files: list[str]
    env_key: str
    bootstrap: bootstrap.BootstrapRequest
    base_key: str
    steps: list[Step] = field(default_factory=list)
    upstream: PinnedBase | None = None  # the verified upstream image the base is extracted from
    suites_opted_out: list[str] = field(default_factory=list)  # default suites the spec's `suites` leaves out
    checks: tuple[ElementCheck, ...] = ()  # the elements' conformance checks (checks.d)

    @property
    def suites(self) -> tuple[suites.SuiteSource, ...]:
        """The suites a bootstrapped base comes from, the release first (none for an upstream base)."""
        if self.upstream is not None:
            return ()
        return tuple(suites.SuiteSource(*s) for s in self.bootstrap.suites)

    @property
    def source_date_epoch(self) -> int | None:
        """The build's SOURCE_DATE_EPOCH (its release's InRelease Date); None for an upstream base."""
        return None if self.upstream is not None else self.bootstrap.source_date_epoch

    @property
    def tree_key(self) -> str:
        """The key of the finished root tree (the last step, or the base)."""
        return self.steps[-1].key if self.steps else self.base_key

    def phase_steps(self, phase: str) -> list[Step]:
        return [s for s in self.steps if s.phase == phase]

    def element_path(self, name: str) -> Path:
        for e in self.elements:
            if e.name == name:
                return Path(e.path)
        raise KeyError(name)


def hook_env(spec: ImageSpec, mirror: str, element_names: Sequence[str],
             host_env: Mapping[str, str]) -> dict[str, str]:
    """The variables every hook sees (besides per-build paths), as diskimage-builder sets them."""
    env = {k: v for k, v in host_env.items() if k.startswith(HOST_ENV_PREFIXES) and k not in HOST_ENV_SKIP}
    env.update({
        "DIB_RELEASE": spec.release,
        "DISTRO_NAME": spec.distro.value,
        "KILN_PACKAGE_FAMILY": packages.family_of(spec.distro.value),  # which package manager install-packages runs
        "ARCH": spec.arch.value,
        "DIB_DISTRIBUTION_MIRROR": mirror,
        "IMAGE_ELEMENT": " ".join(element_names),
        "IMAGE_NAME": spec.name,
        "DIB_INIT_SYSTEM": "systemd",
        "DIB_PYTHON_VERSION": "3",
        "DIB_PYTHON": "python3",
        "DIB_IMAGE_SIZE": str(spec.size // 1024**3),
    })
    env.update(spec.env)
    # read by DIB's manifests element
    env["DIB_ENV"] = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()) if k.startswith("DIB_"))
    env["DIB_ARGS"] = " ".join(element_names)
    return env


def image_apt_env(spec: ImageSpec, sources: Sequence[suites.SuiteSource], security_mirror: str) -> dict[str, str]:
    """What the cleanup element's apt-sources hook writes into a bootstrapped image: its deb822 sources at
    the image's mirrors, signed by the distribution's keyring (or the spec's mirror_keyring, copied in)."""
    if packages.family_of(spec.distro.value) != "debian":
        return {}
    env: dict[str, str] = {"KILN_APT_SOURCES_NAME": f"{spec.distro.value}.sources"}
    signed_by = suites.DISTRO_KEYRINGS[spec.distro.value]
    if spec.mirror_keyring is not None:
        # the key itself, not its path: hooks outside the chroot see no host /tmp, and a new key is a new env
        key = spec.mirror_keyring.read_bytes()
        signed_by = suites.image_keyring_path(key, spec.distro.value)
        env.update(KILN_APT_KEYRING_B64=base64.b64encode(key).decode(), KILN_APT_KEYRING_IMAGE=signed_by)
    build_mirror = sources[0].mirror if sources else ""
    # the image's own sources never carry the build's credentials (an image with a token in it is the token
    # published): an archive that needs them gets image_mirror and apt's auth.conf from an element
    env["KILN_APT_SOURCES"] = suites.apt_sources(
        spec.distro.value, sources, bootstrap.components(spec.distro.value),
        image_mirror=without_credentials(spec.image_mirror or build_mirror),
        image_security_mirror=without_credentials(spec.image_security_mirror or security_mirror or build_mirror),
        signed_by=signed_by)
    return env


_handed_over: dict[str, BuildPlan] = {}
_handed_over_lock = threading.Lock()


def hand_over(plan: BuildPlan) -> str:
    """Keep `plan` for the build that is about to run in this process; the reference to give it. `kiln build`
    plans before it starts Prefect (bad input fails at once) and the flow's plan task takes this plan
    instead of making it again: a build is planned once (one round of InRelease and checksum fetches).
    A flow run in another process (a worker's) finds nothing under the reference and plans itself."""
    ref = uuid.uuid4().hex
    with _handed_over_lock:
        _handed_over[ref] = plan
    return ref


def take_over(ref: str | None) -> BuildPlan | None:
    """The plan handed over under `ref`, once; None when it is not in this process."""
    with _handed_over_lock:
        return _handed_over.pop(ref, None) if ref else None


def make_plan(spec: ImageSpec, *, elements_path: Sequence[str | Path] = (), dib_elements: bool = False,
              host_env: Mapping[str, str] | None = None) -> BuildPlan:
    host_env = dict(os.environ) if host_env is None else dict(host_env)
    # DIB_* secrets from the environment are the spec's secrets: redacted, keyed by HMAC, never in DIB_ENV
    # (DIB's manifests element writes that into the image), a manifest or the plan's shown environment
    found = dib_secrets(host_env)
    if found:
        spec = spec.model_copy(update={"secrets": {**{k: SecretStr(v) for k, v in found.items()}, **spec.secrets}})
        host_env = {k: v for k, v in host_env.items() if k not in found}
    resolved = elements.resolve_image(spec.distro.value, spec.elements, elements_path=elements_path,
                                      env_path=host_env.get("ELEMENTS_PATH", ""), dib_elements=dib_elements)
    return _make_plan(spec, resolved, host_env=host_env)


def _make_plan(spec: ImageSpec, resolved: elements.ResolvedElements, *, host_env: dict[str, str]) -> BuildPlan:
    mirror = resolve_mirror(spec.mirror, host_env, distro=spec.distro.value, bootstrapped=spec.base is None)
    for url in (mirror, spec.security_mirror or "", spec.image_mirror or "", spec.image_security_mirror or ""):
        for credential in credentials_of(url):  # used to fetch, never shown
            redact_value(credential)
    if spec.boot_test.enabled and spec.boot_test.ssh_login and "openssh-server" not in resolved.names:
        raise SpecError("field 'boot_test.ssh_login': the image has no SSH server (no openssh-server element "
                        f"among {', '.join(resolved.names)}); add it, or drop ssh_login")
    infos = [ElementInfo(e.name, str(e.path), e.content_hash, e.origin) for e in resolved.elements]
    element_checks = elements.element_checks(resolved)
    check_waivers(spec.boot_test.waive, [*BUILTIN, *(c.name for c in element_checks)])
    hashes = {i.name: i.hash for i in infos}
    env = hook_env(spec, mirror, resolved.names, host_env)
    suite_names = spec.suites or facts.default_suites(spec.release)
    sources: tuple[suites.SuiteSource, ...] = ()
    source_date_epoch: int | None = None
    if spec.base is None:
        bootstrap.archive_keyring(spec.distro.value, spec.mirror_keyring)  # a missing keyring named first
        security_mirror = ""
        if any(n.endswith("-" + facts.SECURITY_POCKET) for n in suite_names):
            security_mirror = resolve_security_mirror(spec.security_mirror, host_env, distro=spec.distro.value,
                                                      mirror=mirror)
            for credential in credentials_of(security_mirror):
                redact_value(credential)
            env["DIB_DEBIAN_SECURITY_MIRROR"] = security_mirror
        sources = suites.suite_sources(spec.release, suite_names, mirror=mirror, security_mirror=security_mirror,
                                       components=bootstrap.components(spec.distro.value), arch=spec.arch.value,
                                       digest=suite_digest)
        env.update(image_apt_env(spec, sources, security_mirror))
        # every date the build writes (mmdebstrap, hooks, the file systems) is the release's InRelease Date
        if sources:
            source_date_epoch = release_epoch(sources[0].mirror, sources[0].name)
            env["SOURCE_DATE_EPOCH"] = str(source_date_epoch)
    if resolved.libraries:  # DIB's own shell library, which some of its elements source
        env["_LIB"] = str(resolved.libraries[0].parent / "lib")
    env_files = elements.environment_files(resolved)
    for secret in spec.secrets.values():
        redact_value(secret.get_secret_value())
    env_key = digest({
        "secrets": {k: secret_digest(v.get_secret_value()) for k, v in sorted(spec.secrets.items())},
        "helpers": elements.tree_hash(HELPERS),
        "shared": elements.shared_data_hash(resolved),
        "env": env,
        "env_files": [[f.name, _file_hash(f)] for f in env_files],
    })
    upstream: PinnedBase | None = None
    if spec.base is not None:
        # the checksum file is fetched and its signature checked now: a bad one fails before anything runs
        resolved_base = resolve_base(spec.base, distro=spec.distro.value, release=spec.release,
                                     arch=spec.arch.value)
        with tempfile.TemporaryDirectory(prefix="kiln-pin-") as tmp:
            upstream = pin_base(resolved_base, Path(tmp))
        req = bootstrap.BootstrapRequest(spec.distro.value, spec.release, spec.arch.value, mirror)
        base_key = digest(base_key_fields(upstream))
    else:
        keyring = bootstrap.archive_keyring(spec.distro.value, spec.mirror_keyring)
        req = bootstrap.BootstrapRequest(spec.distro.value, spec.release, spec.arch.value, mirror,
                                         include=bootstrap.always_included(spec.distro.value),
                                         suites=tuple((s.name, s.mirror, s.digest) for s in sources),
                                         keyring=keyring, source_date_epoch=source_date_epoch)
        base_key = digest(req.key_fields())
    plan = BuildPlan(spec=spec, mirror=mirror, search_path=[str(p) for p in resolved.search_path], elements=infos,
                     env=env,
                     env_files=[str(f) for f in env_files], env_key=env_key, bootstrap=req, base_key=base_key,
                     upstream=upstream, suites_opted_out=facts.opted_out(spec.release, suite_names),
                     checks=element_checks)

    actions = packages.package_actions(resolved, distro=spec.distro.value, release=spec.release,
                                       arch=spec.arch.value, env=env)
    hooks = elements.hooks_by_phase(resolved)
    parent = base_key
    for phase in elements.PHASES:
        entries: list[tuple[str, str, str, tuple[str, ...]]] = []  # name, element, kind, packages
        for hook in hooks[phase]:
            entries.append((hook.name, hook.element, "hook", ()))
        if phase in packages.PACKAGE_PHASES:
            installs = packages.for_phase(actions, phase, uninstall=False)
            removals = packages.for_phase(actions, phase, uninstall=True)
            if installs:
                entries.append((PACKAGE_STEP, KILN_OWNER, "packages", tuple(installs)))
            if removals:
                entries.append((UNINSTALL_STEP, KILN_OWNER, "uninstall", tuple(removals)))
            if phase == "install.d" and spec.packages:
                entries.append((IMAGE_PACKAGES_STEP, KILN_OWNER, "packages", tuple(spec.packages)))
        names = [e[0] for e in entries]
        for name in names:
            if names.count(name) > 1:
                raise ElementError(f"hook {phase}/{name} is reserved by kiln for package installs")
        entries.sort(key=lambda e: e[0].encode())
        for name, owner, kind, pkgs in entries:
            content = hashes[owner] if kind == "hook" else list(pkgs)
            key = digest({"format": LAYER_FORMAT, "parent": parent, "env": env_key, "phase": phase,
                          "name": name, "kind": kind, "content": content})
            origins = tuple((a.package, a.element) for a in actions
                            if a.phase == phase and a.package in pkgs and (kind == "uninstall") == a.uninstall)
            if name == IMAGE_PACKAGES_STEP:
                origins = tuple((p, "the image spec") for p in pkgs)
            plan.steps.append(Step(len(plan.steps), phase, name, owner, kind, key, pkgs, origins))
            parent = key
    return plan


def _file_hash(path: Path) -> str:
    h = hashlib.sha256(path.read_bytes())
    h.update(f"{path.stat().st_mode & 0o7777:o}".encode())
    return h.hexdigest()
