"""kiln.image.disk and its parts (layout, shellvars, grub, bios, filesystems): fast unit tests on synthetic
data, and one slow test that packs a real root tree.

The slow test packs the tree named by KILN_TEST_TREE (e.g. an mmdebstrap bookworm tree with a cloud
kernel, grub-pc-bin and grub-efi-amd64-bin); it needs root for the overlay mount. Booting the disk is
left to the boot tests: under TCG that takes a minute per firmware.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from kiln.host.mounts import MountStack, mounted_targets
from kiln.host.run import output
from kiln.image import disk
from kiln.image.bios import patch_bios_boot
from kiln.image.disk import PackResult, assemble, kernel_in, write_boot_files
from kiln.image.filesystems import check_fits
from kiln.image.grub import cmdline_from_defaults, grub_cfg_text, grub_cmdline
from kiln.image.layout import GPT_BACKUP, DiskLayout, GiB, MiB, plan_layout
from kiln.image.shellvars import parse_shell_assignments
from kiln.model.errors import CommandError, DiskError

ROOT_UUID = "7e1f5a0c-2b4d-4c6e-9f80-1a2b3c4d5e6f"


def layout(size: int = 4 * GiB, arch: str = "amd64") -> DiskLayout:
    return plan_layout(size=size, arch=arch, root_uuid=ROOT_UUID, esp_serial="1a2b3c4d")


# ---------------------------------------------------------------------------------------------- layout


def test_plan_layout_amd64_matches_debian_cloud_layout() -> None:
    lay = layout()
    assert [p.number for p in lay.partitions] == [14, 15, 1]
    assert lay.bios_boot is not None
    assert (lay.bios_boot.start, lay.bios_boot.size, lay.bios_boot.type_code) == (1 * MiB, 1 * MiB, "EF02")
    assert (lay.esp.start, lay.esp.end, lay.esp.type_code) == (2 * MiB, 128 * MiB, "EF00")
    assert (lay.root.start, lay.root.type_code) == (128 * MiB, "8300")
    # root runs to the last usable sector, right in front of the backup GPT
    assert lay.root.end == 4 * GiB - GPT_BACKUP
    assert lay.root.last_sector == 4 * GiB // 512 - 34
    for p in lay.partitions:
        assert p.start % MiB == 0
        assert p.name
    assert lay.root_fs_size % 4096 == 0
    assert lay.root.size - lay.root_fs_size < 4096
    assert lay.grub_platforms == ("i386-pc", "x86_64-efi")
    assert lay.esp_serial == "1A2B-3C4D"


def test_plan_layout_arm64_has_no_bios_boot_partition() -> None:
    lay = layout(arch="arm64")
    assert lay.bios_boot is None
    assert [p.number for p in lay.partitions] == [15, 1]
    assert (lay.esp.start, lay.esp.end) == (1 * MiB, 128 * MiB)
    assert lay.root.start == 128 * MiB
    assert lay.grub_platforms == ("arm64-efi",)
    assert lay.platform.efi_loader == "BOOTAA64.EFI"


def test_plan_layout_guids_are_stable_and_distinct() -> None:
    a, b = layout(), layout()
    guids = {a.guid(w) for w in ("disk", "part1", "part14", "part15")}
    assert len(guids) == 4
    assert a.guid("disk") == b.guid("disk")
    other = plan_layout(size=4 * GiB, arch="amd64", root_uuid=str(ROOT_UUID[:-1] + "0"), esp_serial="1A2B-3C4D")
    assert other.guid("disk") != a.guid("disk")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "riscv64"}, "unsupported architecture"),
        ({"size": 4 * GiB + 100}, "multiple of 512"),
        ({"size": 150 * MiB}, "too small"),
        ({"root_uuid": "not-a-uuid"}, "not a UUID"),
        ({"esp_serial": "XYZ"}, "8 hex digits"),
    ],
)
def test_plan_layout_rejects_bad_input(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"size": 4 * GiB, "arch": "amd64", "root_uuid": ROOT_UUID, "esp_serial": "1A2B-3C4D"}
    args.update(kwargs)
    with pytest.raises(DiskError, match=message):
        plan_layout(**args)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ /etc/default/grub


def test_parse_shell_assignments_quotes_comments_and_references() -> None:
    text = r"""
# a comment
GRUB_DEFAULT=0
GRUB_TIMEOUT=5   # trailing comment
GRUB_DISTRIBUTOR=`lsb_release -i -s 2> /dev/null || echo Debian`
GRUB_CMDLINE_LINUX_DEFAULT="quiet"
GRUB_CMDLINE_LINUX='console=ttyS0,115200 $literal'
export GRUB_CMDLINE_LINUX_DEFAULT="$GRUB_CMDLINE_LINUX_DEFAULT splash \"x\""
  GRUB_TERMINAL=console\ serial
CONT="a \
b"
GRUB_X=${GRUB_TIMEOUT}s$UNSET
"""
    v = parse_shell_assignments(text)
    assert v["GRUB_TIMEOUT"] == "5"
    assert v["GRUB_CMDLINE_LINUX"] == "console=ttyS0,115200 $literal"
    assert v["GRUB_CMDLINE_LINUX_DEFAULT"] == 'quiet splash "x"'
    assert v["GRUB_TERMINAL"] == "console serial"
    assert v["CONT"] == "a b"
    assert v["GRUB_X"] == "5s"


def test_cmdline_defaults_and_order() -> None:
    assert cmdline_from_defaults({}) == "console=tty0 console=ttyS0,115200n8"
    assert cmdline_from_defaults({"GRUB_CMDLINE_LINUX": ""}) == ""
    assert cmdline_from_defaults({"GRUB_CMDLINE_LINUX": "a  b", "GRUB_CMDLINE_LINUX_DEFAULT": "quiet"}) == "a b quiet"
    assert cmdline_from_defaults({"GRUB_CMDLINE_LINUX_DEFAULT": "quiet"}) == "quiet"


def test_grub_cmdline_reads_grub_d_after_default_grub(tmp_path: Path) -> None:
    assert grub_cmdline(tmp_path) == "console=tty0 console=ttyS0,115200n8"
    d = tmp_path / "etc/default"
    (d / "grub.d").mkdir(parents=True)
    (d / "grub").write_text('GRUB_CMDLINE_LINUX=""\nGRUB_CMDLINE_LINUX_DEFAULT="quiet"\n')
    (d / "grub.d/50-cloud.cfg").write_text('GRUB_CMDLINE_LINUX="console=ttyS0,115200 earlyprintk=ttyS0"\n')
    (d / "grub.d/60-more.cfg").write_text('GRUB_CMDLINE_LINUX_DEFAULT="$GRUB_CMDLINE_LINUX_DEFAULT net.ifnames=0"\n')
    (d / "grub.d/70-ignored.txt").write_text('GRUB_CMDLINE_LINUX="nope"\n')
    assert grub_cmdline(tmp_path) == "console=ttyS0,115200 earlyprintk=ttyS0 quiet net.ifnames=0"


# -------------------------------------------------------------------------------------------- kernels


def _touch(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_kernel_in_picks_the_newest_version(tmp_path: Path) -> None:
    for v in ("6.1.0-9-cloud-amd64", "6.1.0-50-cloud-amd64", "6.1.0-10-cloud-amd64"):
        _touch(tmp_path / f"boot/vmlinuz-{v}")
        _touch(tmp_path / f"boot/initrd.img-{v}")
    _touch(tmp_path / "boot/config-6.1.0-99-cloud-amd64")
    vmlinuz, initrd, version = kernel_in(tmp_path)
    assert version == "6.1.0-50-cloud-amd64"
    assert vmlinuz == tmp_path / "boot/vmlinuz-6.1.0-50-cloud-amd64"
    assert initrd == tmp_path / "boot/initrd.img-6.1.0-50-cloud-amd64"


def test_kernel_in_errors(tmp_path: Path) -> None:
    with pytest.raises(DiskError, match="no kernel"):
        kernel_in(tmp_path)
    _touch(tmp_path / "boot/vmlinuz-6.1.0-50-cloud-amd64")
    with pytest.raises(DiskError, match="no initrd"):
        kernel_in(tmp_path)


# --------------------------------------------------------------------------------------- BIOS patching


def _protective_mbr() -> bytes:
    mbr = bytearray(512)
    mbr[0x1B8:0x1BC] = b"\xde\xad\xbe\xef"
    mbr[0x1BE:0x1CE] = bytes([0, 0, 2, 0, 0xEE, 0xFF, 0xFF, 0xFF]) + struct.pack("<II", 1, 0xFFFFFFFF)
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


def _boot_img() -> bytes:
    img = bytearray(os.urandom(512))
    img[0x5C:0x64] = struct.pack("<Q", 1)
    img[0x64] = 0xFF
    img[0x66:0x68] = b"\xeb\x05"
    img[510:512] = b"\x55\xaa"
    return bytes(img)


def _core_img(sectors: int) -> bytes:
    core = bytearray(os.urandom(sectors * 512 - 100))  # the last sector need not be full
    core[0x1E8:0x1F4] = bytes(12)
    struct.pack_into("<QHH", core, 0x1F4, 2, sectors - 1, 0x820)
    return bytes(core)


def test_patch_bios_boot() -> None:
    mbr, boot, core = _protective_mbr(), _boot_img(), _core_img(312)
    sector0, new_core = patch_bios_boot(mbr, boot, core, 2048)
    assert len(sector0) == 512
    # boot code from boot.img, except the patched fields
    assert sector0[:0x5C] == boot[:0x5C]
    assert struct.unpack_from("<Q", sector0, 0x5C)[0] == 2048
    assert sector0[0x64] == 0xFF
    assert sector0[0x66:0x68] == b"\x90\x90"
    assert sector0[0x68:0x1B8] == boot[0x68:0x1B8]
    # disk signature, protective partition table and 55 AA stay the disk's
    assert sector0[0x1B8:] == mbr[0x1B8:]
    # core.img: only the first blocklist's start changes
    assert len(new_core) == len(core)
    assert struct.unpack_from("<QHH", new_core, 0x1F4) == (2049, 311, 0x820)
    assert new_core[:0x1F4] == core[:0x1F4]
    assert new_core[0x1FC:] == core[0x1FC:]


def test_patch_bios_boot_rejects_unexpected_input() -> None:
    mbr, boot = _protective_mbr(), _boot_img()
    with pytest.raises(DiskError, match="blocklist"):
        patch_bios_boot(mbr, boot, _core_img(312)[:-1024], 2048)  # length no longer matches
    not_protective = bytearray(mbr)
    not_protective[0x1C2] = 0x83
    with pytest.raises(DiskError, match="protective"):
        patch_bios_boot(bytes(not_protective), boot, _core_img(10), 2048)
    with pytest.raises(DiskError, match="55 AA"):
        patch_bios_boot(bytes(512), boot, _core_img(10), 2048)


# ------------------------------------------------------------------------------------------ size check


def test_check_fits_names_sizes_and_suggests_a_size() -> None:
    lay = layout(size=1 * GiB)
    check_fits(500 * MiB, 20_000, lay)
    with pytest.raises(DiskError) as err:
        check_fits(900 * MiB, 20_000, lay)
    text = str(err.value)
    assert "does not fit" in text and "900 MiB" in text and "1.0 GiB disk" in text
    assert "raise the image's size to at least 2 GiB" in text
    with pytest.raises(DiskError, match="inodes"):
        check_fits(1 * MiB, 1_000_000, lay)


# --------------------------------------------------------------------------- boot files on a fake tree


def _fake_tree(root: Path) -> Path:
    tree = root / "tree"
    _touch(tree / "boot/vmlinuz-6.1.0-50-cloud-amd64", b"kernel")
    _touch(tree / "boot/initrd.img-6.1.0-50-cloud-amd64", b"initrd")
    _touch(tree / "etc/fstab", b"# UNCONFIGURED FSTAB FOR BASE SYSTEM\n")
    _touch(tree / "etc/os-release", b'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n')
    _touch(tree / "etc/default/grub.d/cloud.cfg", b'GRUB_CMDLINE_LINUX="console=ttyS0,115200"\nGRUB_TIMEOUT=0\n')
    for platform in ("i386-pc", "x86_64-efi"):
        d = tree / "usr/lib/grub" / platform
        for name in ("kernel.img", "normal.mod", "ext2.mod", "moddep.lst", "modinfo.sh", "config.h"):
            _touch(d / name, name.encode())
    _touch(tree / "usr/lib/grub/i386-pc/boot.img", bytes(512))
    return tree


def _snapshot(tree: Path) -> dict[str, bytes]:
    return {str(p.relative_to(tree)): p.read_bytes() for p in sorted(tree.rglob("*")) if p.is_file()}


def test_write_boot_files(tmp_path: Path) -> None:
    tree = _fake_tree(tmp_path)
    before = _snapshot(tree)
    lay = layout()
    pack_layer = tmp_path / "pack"
    write_boot_files(pack_layer, tree, lay)
    assert _snapshot(tree) == before

    fstab = (pack_layer / "etc/fstab").read_text().splitlines()
    assert f"UUID={ROOT_UUID}\t/\text4\trw,discard,errors=remount-ro\t0\t1" in fstab
    assert "UUID=1A2B-3C4D\t/boot/efi\tvfat\tumask=0077\t0\t1" in fstab
    assert (pack_layer / "boot/efi").is_dir()

    cfg = (pack_layer / "boot/grub/grub.cfg").read_text()
    assert f"linux /boot/vmlinuz-6.1.0-50-cloud-amd64 root=UUID={ROOT_UUID} ro console=ttyS0,115200\n" in cfg
    assert "initrd /boot/initrd.img-6.1.0-50-cloud-amd64\n" in cfg
    assert "set timeout=0\n" in cfg
    assert "serial --unit=0 --speed=115200" in cfg and "terminal_output serial console" in cfg
    assert "Debian GNU/Linux 12 (bookworm), with Linux 6.1.0-50-cloud-amd64" in cfg

    assert sorted(p.name for p in (pack_layer / "boot/grub/i386-pc").iterdir()) == [
        "boot.img",
        "ext2.mod",
        "moddep.lst",
        "modinfo.sh",
        "normal.mod",
    ]
    assert sorted(p.name for p in (pack_layer / "boot/grub/x86_64-efi").iterdir()) == [
        "ext2.mod",
        "moddep.lst",
        "modinfo.sh",
        "normal.mod",
    ]

    with pytest.raises(DiskError, match="not empty"):
        write_boot_files(pack_layer, tree, lay)


def test_write_boot_files_names_the_missing_grub_package(tmp_path: Path) -> None:
    tree = _fake_tree(tmp_path)
    shutil.rmtree(tree / "usr/lib/grub/x86_64-efi")
    with pytest.raises(DiskError, match="grub-efi-amd64-bin"):
        write_boot_files(tmp_path / "pack", tree, layout())


HOST_OS_RELEASE = 'PRETTY_NAME="HOST SECRET 1"\nNAME="HOST SECRET"\n'


@pytest.mark.parametrize(
    ("link", "fallback"),
    [("absolute", False), ("absolute", True), ("relative", False), ("relative", True), ("via-usr-lib", False)],
)
def test_boot_menu_title_never_reads_os_release_outside_the_tree(tmp_path: Path, link: str, fallback: bool) -> None:
    """An os-release symlinked out of the tree (to an absolute host path, or up with ../..) is not read:
    the title comes from the tree's other os-release, else is "Linux"; never from the host file."""
    tree = _fake_tree(tmp_path)
    host = _touch(tmp_path / "host/etc/os-release", HOST_OS_RELEASE.encode())
    (tree / "etc/os-release").unlink()
    if link == "via-usr-lib":
        # etc/os-release -> /usr/lib/os-release, inside the tree (as on Debian), which itself points out of it
        (tree / "etc/os-release").symlink_to("/usr/lib/os-release")
        (tree / "usr/lib").mkdir(parents=True, exist_ok=True)
        (tree / "usr/lib/os-release").symlink_to(host)
    else:
        target = str(host) if link == "absolute" else "../../host/etc/os-release"
        (tree / "etc/os-release").symlink_to(target)
        assert (tree / "etc/os-release").read_text() == HOST_OS_RELEASE  # the link does reach the host file
        if fallback:
            _touch(tree / "usr/lib/os-release", b'PRETTY_NAME="Tree OS 7"\n')
    pack_layer = tmp_path / "pack"
    write_boot_files(pack_layer, tree, layout())
    cfg = (pack_layer / "boot/grub/grub.cfg").read_text()
    assert "HOST SECRET" not in cfg
    title = "Tree OS 7" if fallback else "Linux"
    assert f"menuentry '{title}, with Linux 6.1.0-50-cloud-amd64'" in cfg


def _merged(tmp_path: Path, lay: DiskLayout) -> Path:
    """The overlay the caller would mount, as a plain copy (no root needed)."""
    tree = _fake_tree(tmp_path)
    write_boot_files(tmp_path / "pack", tree, lay)
    merged = tmp_path / "merged"
    shutil.copytree(tree, merged, symlinks=True)
    shutil.copytree(tmp_path / "pack", merged, symlinks=True, dirs_exist_ok=True)
    return merged


def test_assemble_refuses_a_tree_that_does_not_fit_before_writing(tmp_path: Path) -> None:
    lay = layout(size=128 * MiB + 64 * MiB + GPT_BACKUP)
    merged = _merged(tmp_path, lay)
    with open(merged / "big", "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, 80 * MiB)  # allocated, so du counts it, without writing
    out = tmp_path / "out/disk.raw"
    with pytest.raises(DiskError, match=r"does not fit.*raise the image's size to at least 1 GiB"):
        assemble(merged, out, lay, workdir=tmp_path / "work")
    assert not out.exists() and not out.with_name("disk.raw.partial").exists()


def test_assemble_without_boot_files_fails(tmp_path: Path) -> None:
    lay = layout()
    tree = _fake_tree(tmp_path)
    with pytest.raises(DiskError, match="write_boot_files"):
        assemble(tree, tmp_path / "disk.raw", lay, workdir=tmp_path / "work")


def test_assemble_removes_the_partial_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lay = layout(size=1 * GiB)
    merged = _merged(tmp_path, lay)
    out = tmp_path / "disk.raw"
    seen: list[int] = []

    def fake_sgdisk(path: Path, layout: DiskLayout) -> None:
        seen.append(path.stat().st_size)

    def failing_mkimage(merged: Path, platform: str, out: Path, early_cfg: Path) -> None:
        raise CommandError("grub-mkimage -O x86_64-efi: exited with 1", returncode=1, tail=["invalid ELF header"])

    monkeypatch.setattr(disk, "_require_tools", lambda: None)
    monkeypatch.setattr(disk, "write_gpt", fake_sgdisk)
    monkeypatch.setattr(disk, "make_grub_image", failing_mkimage)
    with pytest.raises(CommandError, match="invalid ELF header"):
        assemble(merged, out, lay, workdir=tmp_path / "work")
    assert seen == [1 * GiB]  # the sparse partial file existed, at full size
    assert not out.exists() and not (tmp_path / "disk.raw.partial").exists()


# --------------------------------------------------------------------------------- slow: a real tree


@pytest.mark.slow
def test_pack_real_tree(tmp_path: Path, default_tree: Path) -> None:
    """The default image's own tree (KILN_TEST_TREE: another one) packed again, for amd64 (KILN_TEST_ARCH)."""
    tree = Path(os.environ.get("KILN_TEST_TREE") or default_tree)
    assert (tree / "boot").is_dir(), f"{tree} has no boot/ directory"
    arch = os.environ.get("KILN_TEST_ARCH", "amd64")
    lay = plan_layout(size=3 * GiB, arch=arch, root_uuid=ROOT_UUID, esp_serial="1A2B-3C4D")
    fstab_before = (tree / "etc/fstab").read_bytes() if (tree / "etc/fstab").exists() else None
    out = tmp_path / "disk.raw"

    # what kiln.image.pack does with the layer stack: the boot files into an empty pack layer, mounted over
    # the tree, and the disk assembled from the merged view
    work = tmp_path / "work"
    pack_layer = work / "pack-layer"
    write_boot_files(pack_layer, tree, lay)
    with MountStack(work) as mounts:
        merged = mounts.overlay([pack_layer, tree], work / "merged")
        result = assemble(merged, out, lay, workdir=work / "assemble")

    assert isinstance(result, PackResult)
    assert result.path == out and out.stat().st_size == 3 * GiB
    assert not (tmp_path / "disk.raw.partial").exists()
    assert not any(t.startswith(str(tmp_path)) for t in mounted_targets())
    assert ((tree / "etc/fstab").read_bytes() if (tree / "etc/fstab").exists() else None) == fstab_before
    _, _, version = kernel_in(tree)
    assert result.kernel == f"boot/vmlinuz-{version}" and result.initrd == f"boot/initrd.img-{version}"
    assert result.cmdline.startswith(f"root=UUID={ROOT_UUID} ro ")

    gpt = output(["sgdisk", "-p", str(out)])
    rows = {line.split()[0]: line.split() for line in gpt.splitlines() if line.strip()[:2].strip().isdigit()}
    assert rows["1"][1:3] == ["262144", str(3 * GiB // 512 - 34)] and rows["1"][-2:] == ["8300", "root"]
    assert rows["15"][-2:] == ["EF00", "esp"]
    if arch == "amd64":
        assert rows["14"][1:3] == ["2048", "4095"] and rows["14"][-2:] == ["EF02", "bios-boot"]
    assert "No problems found" in output(["sgdisk", "-v", str(out)])

    listing = output(
        ["mdir", "-/", "-b", "-i", f"{out}@@{lay.esp.start}", "::"], env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    )
    assert f"::/EFI/BOOT/{lay.platform.efi_loader}" in listing
    info = output(["minfo", "-i", f"{out}@@{lay.esp.start}", "::"], env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    assert "serial number: 1A2B3C4D" in info and 'disk type="FAT32   "' in info

    root = f"{out}?offset={lay.root.start}"
    fstab = output(["debugfs", "-R", "cat /etc/fstab", root])
    assert f"UUID={ROOT_UUID}\t/\text4" in fstab and "UUID=1A2B-3C4D\t/boot/efi\tvfat\tumask=0077" in fstab
    cfg = output(["debugfs", "-R", "cat /boot/grub/grub.cfg", root])
    assert f"linux /boot/vmlinuz-{version} root=UUID={ROOT_UUID} ro" in cfg
    modules = output(["debugfs", "-R", f"ls /boot/grub/{lay.grub_platforms[0]}", root])
    assert "normal.mod" in modules
    header = output(["dumpe2fs", "-h", root])
    assert "Filesystem volume name:   cloudimg-rootfs" in header
    assert f"Filesystem UUID:          {ROOT_UUID}" in header
    features = next(line for line in header.splitlines() if line.startswith("Filesystem features:"))
    # GRUB 2.06 cannot read these
    assert "metadata_csum_seed" not in features and "orphan_file" not in features

    if arch == "amd64":
        with open(out, "rb") as fh:
            sector0 = fh.read(512)
            fh.seek(1 * MiB)
            core_first = fh.read(512)
        assert struct.unpack_from("<Q", sector0, 0x5C)[0] == 2048
        assert sector0[0x1C2] == 0xEE and sector0[510:] == b"\x55\xaa"
        assert struct.unpack_from("<Q", core_first, 0x1F4)[0] == 2049


def test_grub_cfg_with_an_empty_cmdline_has_no_trailing_blank() -> None:
    cfg = grub_cfg_text(layout=layout(), version="6.1.0-50-cloud-amd64", cmdline="", title="Debian", timeout=1)
    assert f"linux /boot/vmlinuz-6.1.0-50-cloud-amd64 root=UUID={ROOT_UUID} ro\n" in cfg
    with pytest.raises(DiskError, match="newline"):
        grub_cfg_text(layout=layout(), version="6.1", cmdline="a\nb", title="Debian", timeout=1)
