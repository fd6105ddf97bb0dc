"""The base root tree of a Debian or Ubuntu image, bootstrapped with mmdebstrap from a mirror.

Downloaded .debs are shared through a package cache directory (hard-linked in before and out after),
so a changed package set downloads only what is new. The result is the bottom layer of the stack.
"""

from __future__ import annotations

import logging
import os
import shlex
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from kiln.host.checksums import file_digests
from kiln.host.progress import activity
from kiln.host.run import run
from kiln.model.errors import SpecError
from kiln.model.facts import COMPONENTS
from kiln.model.urls import without_credentials

log = logging.getLogger("kiln.bootstrap")

BOOTSTRAP_VERSION = "4"  # bump when the bootstrap's command line changes what it produces
VARIANT = "minbase"
# the archive keyring mmdebstrap checks an Ubuntu mirror's Release files with (the host's apt keyrings
# are Debian's); the spec's mirror_keyring overrides it
UBUNTU_KEYRING = Path("/usr/share/keyrings/ubuntu-archive-keyring.gpg")


def components(distro: str) -> tuple[str, ...]:
    return COMPONENTS[distro]


def always_included(distro: str) -> tuple[str, ...]:
    """Packages the bootstrap asks for by name: mmdebstrap's minbase takes apt only where the archive
    gives it Priority: required (Debian's does; Ubuntu's and a private archive without override files
    may not), and every element installs its packages with it; kiln names it, as debootstrap's minbase
    does (it costs nothing where the archive already has it required)."""
    return ("apt",)


@dataclass(frozen=True)
class BootstrapRequest:
    distro: str
    release: str
    arch: str
    mirror: str
    include: tuple[str, ...] = ()
    # (suite, mirror, InRelease sha256) of every suite, the release first: a new upload to any of them
    # means a new base. Empty: the release alone from `mirror`, unpinned (tests and upstream bases).
    suites: tuple[tuple[str, str, str], ...] = ()
    keyring: str | None = None  # checks the mirror's Release files; None: the host's apt keyrings
    # the release's InRelease Date (kiln.sources.epoch): mmdebstrap's SOURCE_DATE_EPOCH; None: the clock's
    source_date_epoch: int | None = None

    @property
    def release_digest(self) -> str:
        return self.suites[0][2] if self.suites else ""

    def sources(self) -> list[str]:
        """mmdebstrap's mirror arguments: one sources.list line per suite."""
        comps = " ".join(components(self.distro))
        if not self.suites:
            return [self.mirror]
        return [f"deb {mirror} {suite} {comps}" for suite, mirror, _ in self.suites]

    def key_fields(self) -> dict[str, object]:
        return {
            "stage": "bootstrap",
            "version": BOOTSTRAP_VERSION,
            "distro": self.distro,
            "release": self.release,
            "arch": self.arch,
            "mirror": self.mirror,
            "variant": VARIANT,
            "components": list(components(self.distro)),
            "include": sorted(self.include),
            "suites": [list(s) for s in self.suites],
            # the key that vouches for the base, by content (where the file lies says nothing)
            **({"keyring": file_digests(Path(self.keyring), ("sha256",))["sha256"]} if self.keyring else {}),
            **({"source_date_epoch": self.source_date_epoch} if self.source_date_epoch is not None else {}),
        }


def mmdebstrap_argv(req: BootstrapRequest, target: Path, deb_cache: Path) -> list[str]:
    cache = shlex.quote(str(deb_cache))
    argv = [
        "mmdebstrap",
        f"--variant={VARIANT}",
        f"--architectures={req.arch}",
        f"--components={','.join(components(req.distro))}",
        "--aptopt=Acquire::Retries 3",
        # keep the package lists: DIB elements run apt-get in pre-install.d, before any update of theirs;
        # the cleanup element removes them at the end of the build
        "--skip=cleanup/apt/lists",
        # keep the essential packages' .debs until the customize hook has shared them (mmdebstrap deletes
        # them once installed; the end of the bootstrap empties the archives anyway)
        "--skip=essential/unlink",
        "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives",
        f"--setup-hook=find {cache} -maxdepth 1 -name '*.deb' "
        "-exec cp -l -t \"$1\"/var/cache/apt/archives/ {} + 2>/dev/null || true",
        f"--customize-hook=find \"$1\"/var/cache/apt/archives -maxdepth 1 -name '*.deb' "
        f"-exec cp -l -n -t {cache}/ {{}} + 2>/dev/null || true",
    ]
    if req.keyring:
        argv.append(f"--keyring={req.keyring}")
    if req.include:
        argv.append("--include=" + ",".join(sorted(req.include)))
    argv += [req.release, str(target), *req.sources()]
    return argv


def archive_keyring(distro: str, spec_keyring: Path | None) -> str | None:
    """The keyring for the bootstrap mirror: the spec's, else Ubuntu's archive keyring for Ubuntu, else
    None (the host's apt keyrings, which hold Debian's)."""
    if spec_keyring is not None:
        if not spec_keyring.is_file():
            raise SpecError(f"mirror_keyring {spec_keyring}: no such file")
        return str(spec_keyring.resolve())
    if distro == "ubuntu":
        if not UBUNTU_KEYRING.is_file():
            raise SpecError(f"distro ubuntu: no keyring for the Ubuntu archive ({UBUNTU_KEYRING} is missing): "
                            "install Ubuntu's ubuntu-keyring package, or set mirror_keyring to the archive key")
        return str(UBUNTU_KEYRING)
    return None


def readable_keyring(keyring: Path, directory: Path) -> Path:
    """A copy of `keyring` that apt's unprivileged `_apt` user can read, named as apt wants it: `.asc`
    for an armored key, `.gpg` for a binary one (the operator's file may be neither, and under a private
    directory)."""
    data = keyring.read_bytes()
    copy = directory / ("mirror-keyring.asc" if data.lstrip().startswith(b"-----BEGIN PGP") else "mirror-keyring.gpg")
    copy.write_bytes(data)
    copy.chmod(0o644)
    directory.chmod(0o755)
    return copy


def bootstrap(req: BootstrapRequest, target: Path, *, deb_cache: Path, timeout: float = 1800) -> None:
    """Bootstrap `req` into the empty directory `target`."""
    deb_cache.mkdir(parents=True, exist_ok=True)
    log.info("bootstrapping %s %s %s from %s (suites %s)", req.distro, req.release, req.arch,
             without_credentials(req.mirror),
             ", ".join(s[0] for s in req.suites) or req.release)
    with tempfile.TemporaryDirectory(prefix="kiln-keyring-") as keys:
        if req.keyring:
            req = replace(req, keyring=str(readable_keyring(Path(req.keyring), Path(keys))))
        # with SOURCE_DATE_EPOCH, mmdebstrap and dpkg's maintainer scripts take their dates from it (shadow's
        # last password change, mtimes), and mmdebstrap removes the logs and caches that differ per run
        env = None if req.source_date_epoch is None else {**os.environ,
                                                           "SOURCE_DATE_EPOCH": str(req.source_date_epoch)}
        with activity(f"bootstrap {req.distro} {req.release} {req.arch}") as note:
            run(mmdebstrap_argv(req, target, deb_cache), env=env, timeout=timeout, on_line=note,
                what=f"bootstrap of {req.distro} {req.release} ({req.arch}) from {req.mirror}")
