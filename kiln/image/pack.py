"""Pack: flatten the finished layer stack into a bootable raw disk, cached in the store.

The disk's file system UUIDs are derived from the tree's key, so the same tree always packs to a
disk with the same identifiers.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from kiln.build.customize import BuildContext, layer_keys, layer_stack
from kiln.build.packages import family_of
from kiln.build.plan import BuildPlan, digest
from kiln.host.mounts import MountStack
from kiln.host.run import output, tracked
from kiln.image import disk
from kiln.image.inventory import space_report, with_licenses
from kiln.image.layout import plan_layout
from kiln.model.record import SpaceRecord

log = logging.getLogger("kiln.pack")

PACK_VERSION = "4"  # 4: reproducible file systems (a hash seed from the key, dates at SOURCE_DATE_EPOCH)
UUID_NAMESPACE = uuid.UUID("6f1c6b1e-3d0a-4c55-9d6e-6b696c6e0001")


@dataclass(frozen=True)
class PackOutput:
    key: str
    raw: Path
    kernel: Path | None
    packages: list[dict[str, str]]
    root_uuid: str
    esp_serial: str
    cmdline: str
    secure_boot: bool = False  # the ESP boots the distribution's signed chain
    space: SpaceRecord | None = None  # what takes the space: largest directories and packages


def pack_key(ctx: BuildContext) -> str:
    return pack_key_of(ctx.plan)


def pack_key_of(plan: BuildPlan) -> str:
    """The pack stage's key: the finished tree's, the disk's size and architecture."""
    spec = plan.spec
    return digest({"stage": "pack", "version": PACK_VERSION, "tree": plan.tree_key, "size": spec.size,
                   "arch": spec.arch.value})


RPM_DBS = ("usr/lib/sysimage/rpm", "var/lib/rpm")  # Fedora 36+ and EL 9+ first, then the classic place


def list_packages(root: Path, family: str = "debian") -> list[dict[str, str]]:
    """Installed packages of the tree, read from its package database without chrooting: dpkg's for the
    Debian family, rpm's (with the host's rpm) for the Red Hat family."""
    if family == "redhat":
        return _rpm_packages(root)
    admindir = root / "var/lib/dpkg"
    if not admindir.is_dir():
        return []
    text = output(["dpkg-query", f"--admindir={admindir}", "-W",
                   "-f", "${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\n"])
    packages = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) == 4 and parts[0].startswith("ii"):
            packages.append({"name": parts[1], "version": parts[2], "arch": parts[3]})
    return packages


def _rpm_packages(root: Path) -> list[dict[str, str]]:
    dbpath = next((root / d for d in RPM_DBS if (root / d).is_dir() and any((root / d).iterdir())), None)
    if dbpath is None:
        return []
    if shutil.which("rpm") is None:
        log.warning("no rpm on this host: the manifest lists no packages of this image (install rpm)")
        return []
    text = output(["rpm", f"--dbpath={dbpath.resolve()}", "-qa", "--qf",
                   r"%{NAME}\t%{EVR}\t%{ARCH}\t%{LICENSE}\n"])
    packages = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) == 4:
            name, version, arch, license_ = parts
            packages.append({"name": name, "version": version, "arch": arch,
                             **({"license": license_} if license_ and license_ != "(none)" else {})})
    return sorted(packages, key=lambda p: p["name"])


def _load(ctx: BuildContext, key: str) -> PackOutput:
    data = ctx.store.data(key)
    info = json.loads((data / "pack.json").read_text())
    kernel = data / "vmlinuz"
    return PackOutput(key=key, raw=data / "disk.raw", kernel=kernel if kernel.exists() else None,
                      packages=info["packages"], root_uuid=info["root_uuid"], esp_serial=info["esp_serial"],
                      cmdline=info["cmdline"], secure_boot=bool(info.get("secure_boot")),
                      space=SpaceRecord.model_validate(info["space"]) if info.get("space") else None)


def pack(ctx: BuildContext) -> tuple[PackOutput, bool]:
    """The raw disk of the plan's finished tree; (output, whether it came from the store)."""
    key = pack_key(ctx)
    store = ctx.store
    description = f"{ctx.plan.spec.name} raw disk"
    with store.step(key, kind="disk", description=description, rebuild=ctx.rebuild) as entry:
        if entry.cached:
            return _load(ctx, key), True
        assert entry.scratch is not None
        tmp = entry.scratch
        log.info("packing %s into a %d MiB disk", ctx.plan.spec.name, ctx.plan.spec.size // 1024**2)
        root_uuid = str(uuid.uuid5(UUID_NAMESPACE, key))
        esp_serial = f"{key[:4]}-{key[4:8]}".upper()
        layout = plan_layout(size=ctx.plan.spec.size, arch=ctx.plan.spec.arch.value, root_uuid=root_uuid,
                             esp_serial=esp_serial)
        held = ctx.store.holding(layer_keys(ctx, len(ctx.plan.steps)))  # no gc removes a layer under us
        with held, tracked(ctx.workdir), MountStack(ctx.workdir) as mounts:
            lowers = layer_stack(ctx, len(ctx.plan.steps))
            tree = mounts.overlay(lowers, ctx.workdir / "tree")
            pack_layer = tmp / "pack-layer"
            pack_layer.mkdir()
            disk.write_boot_files(pack_layer, tree, layout)
            merged = mounts.overlay([pack_layer, *lowers], ctx.workdir / "merged")
            family = family_of(ctx.plan.spec.distro.value)
            packages = with_licenses(merged, list_packages(merged, family))
            space = space_report(merged, family)
            result = disk.assemble(merged, tmp / "data" / "disk.raw", layout, workdir=tmp,
                                   source_date_epoch=ctx.plan.source_date_epoch)
            kernel = merged / str(result.kernel).lstrip("/")
            # the image's kernel, for a direct-kernel boot probe: only a regular file that is inside the tree
            # (the tree is mounted at `merged`, not chrooted: an absolute link, of the kernel or of boot/,
            # would name a host file)
            if kernel.is_file() and kernel.resolve().is_relative_to(merged.resolve()):
                shutil.copyfile(kernel, tmp / "data" / "vmlinuz")
            (tmp / "data" / "pack.json").write_text(json.dumps({
                "packages": packages, "root_uuid": root_uuid, "esp_serial": esp_serial, "cmdline": result.cmdline,
                "secure_boot": result.secure_boot, "space": space.model_dump(mode="json"),
            }, indent=1))
            mounts.unmount_all()
    return _load(ctx, key), False
