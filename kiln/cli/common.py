"""What the subcommands share: their common options."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from kiln.image.filesystems import ROOT_LABEL
from kiln.model.errors import SpecError
from kiln.model.spec import parse_size

CACHE_HELP = "the layer and artifact store (default: KILN_CACHE, else ~/.cache/kiln)"


def add_cache(parser: argparse.ArgumentParser) -> None:
    """--cache: the store, the same option for every command that reads or writes it."""
    parser.add_argument("--cache", metavar="DIR", help=CACHE_HELP)


class KilnArgumentParser(argparse.ArgumentParser):
    """kiln's parsers: no abbreviated options (`--cloud` is never read as `--clouds-yaml`), and a usage error
    is one line naming the command, exit code 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"kiln: error: {self.prog}: {message} (see {self.prog} --help)\n")


def add_verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """-v works after the subcommand too (`kiln build -v …` as `kiln -v build …`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                if not any("-v" in a.option_strings for a in sub._actions):
                    sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                     help="log kiln's debug output")
                add_verbose_everywhere(sub)


def port_arg(value: str) -> int:
    """An argparse type: a TCP port, 1 to 65535."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {value!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is not between 1 and 65535")
    return port


def size_arg(value: str) -> int:
    """An argparse type: a size such as 20G."""
    try:
        return parse_size(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_cloud_options(parser: argparse.ArgumentParser, *, nova: bool, cloud_help: str | None = None) -> None:
    """How every command that talks to a cloud is told which, as the `openstack` CLI is: --cloud NAME (else
    OS_CLOUD), --clouds-yaml PATH (else OS_CLIENT_CONFIG_FILE, else the usual places); and, where a Nova
    boot can happen, what to boot with."""
    parser.add_argument("--cloud", metavar="NAME", help=cloud_help or "a clouds.yaml entry (default: OS_CLOUD)")
    parser.add_argument("--clouds-yaml", type=Path, metavar="PATH",
                        help="a clouds.yaml to read (default: OS_CLIENT_CONFIG_FILE, else the usual places)")
    if nova:
        parser.add_argument("--flavor", help="Nova boot: flavor name or id (default: KILN_NOVA_FLAVOR, the cloud's "
                            "kiln.boot_flavor, else the smallest that fits)")
        parser.add_argument("--network", help="Nova boot: none (default), auto, or a network name or id")


def dib_variables(env: Mapping[str, str], *, release: str | None, size: str | None, where: str) -> dict[str, Any]:
    """What diskimage-builder's own variables ask of the image, for `kiln build` and `kiln dib` alike; none
    is silently ignored. DIB_RELEASE and DIB_IMAGE_SIZE (GiB) become the release and size where `where` (the
    spec and flags, or the DIB line) names none, and are an error where they contradict one; FS_TYPE and
    DIB_ROOT_LABEL are accepted when they ask for what kiln makes (an ext4 root labelled cloudimg-rootfs)
    and refused otherwise. Returns the spec fields to set."""
    fields: dict[str, Any] = {}
    wanted = env.get("DIB_RELEASE", "").strip()
    if wanted:
        if release and release != wanted:
            raise SpecError(f"DIB_RELEASE={wanted} contradicts the release {release!r} of {where}: unset "
                            "DIB_RELEASE or make them agree")
        fields["release"] = wanted
    gib = env.get("DIB_IMAGE_SIZE", "").strip()
    if gib:
        try:
            wanted_size = parse_size(f"{gib}G")
        except ValueError:
            raise SpecError(f"DIB_IMAGE_SIZE={gib}: not a number of GiB") from None
        try:
            given = parse_size(size) if size else None
        except ValueError as exc:
            raise SpecError(f"size {size!r} of {where}: {exc}") from None
        if given is not None and given != wanted_size:
            raise SpecError(f"DIB_IMAGE_SIZE={gib} contradicts the size {size} of {where}: unset DIB_IMAGE_SIZE "
                            "or make them agree")
        fields["size"] = f"{gib}G"
    fs_type = env.get("FS_TYPE", "").strip()
    if fs_type and fs_type != "ext4":
        raise SpecError(f"FS_TYPE={fs_type}: kiln makes ext4 root file systems only; unset FS_TYPE")
    label = env.get("DIB_ROOT_LABEL", "").strip()
    if label and label != ROOT_LABEL:
        raise SpecError(f"DIB_ROOT_LABEL={label}: kiln labels the root file system {ROOT_LABEL} (what "
                        "cloud-images and growroot expect); unset DIB_ROOT_LABEL")
    return fields
