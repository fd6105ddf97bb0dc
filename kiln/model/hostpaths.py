"""What a run started from the Prefect UI or API may ask of the worker's host.

Whoever can create a flow run names its parameters, and kiln runs as root: an output directory, a cache, an
element directory, a `file://` mirror or a keyring anywhere on the host would let them write into /etc or read
/root. So a run that came from a deployment may name host paths only under the roots its worker's host allows
(the `output/`, `images/` and `elements/` of the kiln checkout the worker runs from, and what
`KILN_ALLOWED_PATHS` adds, colon-separated; never the store, which holds strangers' trees), may
not open a shell on the host (`break_at`), and carries no secret values: parameters are stored in Prefect's
database, so secrets come from Prefect Secret blocks the spec names (`secret_blocks`).
A build started with `kiln build` on the host itself is its user's own, and is not limited.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path

from kiln.model.errors import SpecError
from kiln.model.options import BuildOptions
from kiln.model.spec import ImageSpec

ALLOWED_ENV = "KILN_ALLOWED_PATHS"


def _file_url_path(url: str) -> str | None:
    return urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file:") else None


def _urls(value: str | list[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def named_paths(spec: ImageSpec | None, options: BuildOptions | None) -> list[tuple[str, str]]:
    """Every host path the parameters name: (field, path)."""
    found: list[tuple[str, str]] = []
    if options is not None:
        found.append(("options.output", options.output))
        found += [(f"options.elements_path[{i}]", p) for i, p in enumerate(options.elements_path)]
        if options.cache:
            found.append(("options.cache", options.cache))
    if spec is not None:
        # a hook's variable may name a host file an element copies in (DIB's apt-conf: DIB_APT_CONF): every value
        # that could be a path is one (a URL is not, but a file:// one is)
        for name, value in sorted(spec.env.items()):
            path = _file_url_path(value)
            if path is None and "/" in value and not re.match(r"^[a-z][a-z0-9+.-]*://", value):
                path = value
            if path is not None:
                found.append((f"spec.env.{name}", path))
        for name in ("mirror", "security_mirror"):
            path = _file_url_path(getattr(spec, name) or "")
            if path is not None:
                found.append((f"spec.{name}", path))
        if spec.mirror_keyring is not None:
            found.append(("spec.mirror_keyring", str(spec.mirror_keyring)))
        if spec.base is not None:
            for name in ("url", "checksum_url", "signature_url"):
                for i, url in enumerate(_urls(getattr(spec.base, name, None))):
                    path = _file_url_path(url)
                    if path is not None:
                        found.append((f"spec.base.{name}" + (f"[{i}]" if i else ""), path))
            keyring = getattr(spec.base, "keyring", None)
            if keyring is not None:
                found.append(("spec.base.keyring", str(keyring)))
    return found


def allowed_roots(env_value: str | None, defaults: Sequence[Path]) -> list[Path]:
    """`defaults` (in the worker's checkout) and the roots of `KILN_ALLOWED_PATHS` (absolute paths)."""
    roots = [Path(os.path.realpath(p)) for p in defaults]
    for entry in (env_value or "").split(":"):
        if not entry:
            continue
        if not entry.startswith("/"):
            raise SpecError(f"{ALLOWED_ENV}: {entry!r} is not an absolute path")
        roots.append(Path(os.path.realpath(entry)))
    return roots


def outside(paths: Iterable[tuple[str, str]], roots: Sequence[Path], cwd: Path) -> list[tuple[str, str]]:
    """The (field, path) of `paths` that lie outside every root: resolved as the build would open them
    (relative to `cwd`, `..` and the links that exist followed)."""
    bad = []
    for field, value in paths:
        real = Path(os.path.realpath(cwd / value))
        if not any(real == root or real.is_relative_to(root) for root in roots):
            bad.append((field, value))
    return bad


def check_remote_run(spec: ImageSpec | None, options: BuildOptions | None, *, roots: Sequence[Path], cwd: Path,
                     extra: Iterable[tuple[str, str]] = ()) -> None:
    """Refuse, naming the field, what a run started from the UI or the API may not ask of this host."""
    if spec is not None and spec.secrets:
        names = ", ".join(sorted(spec.secrets))
        raise SpecError(f"spec.secrets ({names}): a run started from the UI or the API keeps its parameters in "
                        "Prefect's database; store each secret in a Prefect Secret block and name it in "
                        "spec.secret_blocks (VARIABLE: block-name)")
    if options is not None and options.break_at:
        raise SpecError(f"options.break_at ({options.break_at}): a shell on the worker's host is not for a run "
                        "started from the UI or the API (use `kiln build --break` on the host)")
    bad = outside([*named_paths(spec, options), *extra], roots, cwd)
    if bad:
        field, value = bad[0]
        raise SpecError(f"{field}: {value} is outside the paths this worker's host allows runs started from the "
                        f"UI or the API to name ({', '.join(str(r) for r in roots)}; set {ALLOWED_ENV} on the "
                        "worker's host to allow more)")
