"""Secure Boot: the signed chain found in a tree (never through a link to the host), put on the ESP, and the
QEMU machine that enforces it. The boot with Secure Boot enforced is in test_build_e2e.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kiln.boot.local import boot_firmware
from kiln.boot.qemu import SECURE_BOOT_FILES, qemu_argv
from kiln.cloud.properties import glance_properties
from kiln.image.grub import SIGNED_CHAIN, esp_files, signed_chain
from kiln.image.layout import plan_layout
from kiln.model import facts
from kiln.model.publishing import PublishSpec
from kiln.model.record import BuildRecord, DiskRecord, ImageRecord
from kiln.model.spec import spec_from_dict

SHIM, GRUB, MOK = SIGNED_CHAIN["x86_64-efi"]


def _tree(root: Path, *, mok: bool = True) -> Path:
    for rel in (SHIM, GRUB, *([MOK] if mok else [])):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"MZ " + rel.encode())
    return root


def test_the_signed_chain_goes_on_the_esp_as_the_removable_loader(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree")
    chain = signed_chain(tree, "x86_64-efi")
    assert chain is not None and chain.mok_manager is not None
    layout = plan_layout(size=4 << 30, arch="amd64", root_uuid="0" * 8 + "-0000-0000-0000-" + "0" * 12,
                         esp_serial="1A2B-3C4D")
    files = dict((target, src) for src, target in esp_files(layout, efi_image=None, chain=chain,
                                                             early_cfg=tmp_path / "early.cfg"))
    assert files["EFI/BOOT/BOOTX64.EFI"] == tree / SHIM
    assert files["EFI/BOOT/grubx64.efi"] == tree / GRUB
    assert files["EFI/BOOT/grub.cfg"] == files["EFI/debian/grub.cfg"] == tmp_path / "early.cfg"
    assert files["EFI/BOOT/mmx64.efi"] == tree / MOK
    unsigned = esp_files(layout, efi_image=tmp_path / "BOOTX64.EFI", chain=None, early_cfg=tmp_path / "e")
    assert [t for _, t in unsigned] == ["EFI/BOOT/BOOTX64.EFI", "EFI/debian/grubx64.efi"]


def test_no_chain_without_both_signed_binaries_or_on_arm64(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree")
    (tree / GRUB).unlink()
    assert signed_chain(tree, "x86_64-efi") is None
    assert signed_chain(_tree(tmp_path / "t2"), "arm64-efi") is None


def test_a_signed_binary_linked_to_a_host_file_is_not_taken(tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "grubx64.efi.signed").write_bytes(b"a host file")
    tree = _tree(tmp_path / "tree")
    (tree / GRUB).unlink()
    (tree / GRUB).parent.rmdir()
    (tree / GRUB).parent.symlink_to(host)  # usr/lib/grub/x86_64-efi-signed -> the host's directory
    assert signed_chain(tree, "x86_64-efi") is None
    (tree / SHIM).unlink()
    (tree / SHIM).symlink_to(os.path.relpath(host / "grubx64.efi.signed", (tree / SHIM).parent))
    assert signed_chain(tree, "x86_64-efi") is None


def test_argv_enforces_secure_boot_with_smm_and_microsofts_keys() -> None:
    code, vars_ = SECURE_BOOT_FILES["amd64"]
    argv = qemu_argv(arch="amd64", firmware="uefi-secureboot", accel="tcg", disk=Path("/w/o.qcow2"), seed_iso=None,
                     serial_socket=Path("/s/serial.sock"), serial_log=Path("/w/s.log"), firmware_code=code,
                     firmware_vars=Path("/w/vars.fd"))
    joined = " ".join(argv)
    assert "-machine q35,smm=on" in joined
    assert "-global driver=cfi.pflash01,property=secure,value=on" in joined
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={code}" in joined
    assert code.name == "OVMF_CODE_4M.secboot.fd" and vars_.name == "OVMF_VARS_4M.ms.fd"
    with pytest.raises(ValueError, match="arm64 boots with uefi only"):
        qemu_argv(arch="arm64", firmware="uefi-secureboot", accel="tcg", disk=Path("/w/o.qcow2"), seed_iso=None,
                  serial_socket=Path("/s/s"), serial_log=Path("/w/s.log"), firmware_code=code,
                  firmware_vars=Path("/w/v"))


def test_the_default_image_is_boot_tested_with_secure_boot_and_arm64_is_not() -> None:
    spec = spec_from_dict({"boot_test": {"firmware": ["bios", "uefi", "uefi-secureboot"]}}, "t")
    assert boot_firmware(spec) == ["bios", "uefi", "uefi-secureboot"]
    arm = spec_from_dict({"arch": "arm64", "boot_test": {"firmware": ["uefi-secureboot"]}}, "t")
    assert boot_firmware(arm) == ["uefi"]
    assert facts.SECURE_BOOT in facts.boot_firmware_of("amd64")


def test_glance_says_when_the_image_boots_the_signed_chain() -> None:
    def props(firmware: list[str]) -> dict[str, str]:
        build = BuildRecord(kiln_version="t", build_id="b", spec={"name": "n", "arch": "amd64", "distro": "debian",
                                                                 "release": "bookworm"},
                            disk=DiskRecord(size=1, firmware=firmware))
        image = ImageRecord(file="n.qcow2", format="qcow2", size=1, sha256="0" * 64, sha512="0" * 128)
        return glance_properties(build, image, PublishSpec(), name="n")

    assert props(["bios", "uefi", "uefi-secureboot"])["os_secure_boot"] == "optional"
    assert "os_secure_boot" not in props(["bios", "uefi"])


def test_uefi_keeps_the_nics_ipxe_rom_and_bios_does_not() -> None:
    """Without the ROM, OVMF's own virtio-net driver leaves the NIC so that the signed GRUB spins after a warm
    reset (the conformance suite's reboot hung there); SeaBIOS needs no ROM and gets none."""
    def nic(firmware: str) -> str:
        argv = qemu_argv(arch="amd64", firmware=firmware, accel="tcg", disk=Path("/w/o.qcow2"), seed_iso=None,
                         serial_socket=Path("/s/s"), serial_log=Path("/w/s.log"), firmware_code=Path("/c"),
                         firmware_vars=Path("/v"))
        return next(a for a in argv if a.startswith("virtio-net-pci"))

    assert nic("bios") == "virtio-net-pci,netdev=net0,romfile="
    assert nic("uefi") == nic("uefi-secureboot") == "virtio-net-pci,netdev=net0"
