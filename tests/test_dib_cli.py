from __future__ import annotations

import pytest

from kiln.cli.dib import parse
from kiln.model.errors import SpecError
from kiln.model.spec import Arch, ImageFormat


def test_seed_document_line() -> None:
    env = {"DIB_RELEASE": "bookworm", "DIB_CLOUD_INIT_DATASOURCES": "ConfigDrive, OpenStack, NoCloud"}
    spec, opts = parse(["--offline", "-a", "amd64", "-o", "debian-bookworm-amd64", "vm", "cloud-init-cfg",
                        "debian"], env)
    assert spec.name == "debian-bookworm-amd64"
    assert spec.distro.value == "debian" and spec.release == "bookworm" and spec.arch is Arch.amd64
    assert spec.elements == ["vm", "cloud-init-cfg", "debian"]  # DIB's debian, not only the base
    assert spec.formats == [ImageFormat.qcow2]
    assert spec.compression == "zstd"  # disk-image-create compresses qcow2 unless -u
    assert spec.env == {"DIB_OFFLINE": "1"}
    assert opts["output"] == "." and opts["boot_test"] is True


def test_options_map_to_the_spec() -> None:
    spec, opts = parse(["-a", "x86_64", "-o", "out/dir/img", "-t", "qcow2,raw,vhd", "-x", "-u", "-p", "htop,vim",
                        "-p", "curl", "--image-size", "3", "--qemu-img-options", "compat=1.1", "--checksum",
                        "debian-minimal", "vm"], {})
    assert spec.name == "img" and opts["output"] == "out/dir"
    assert [f.value for f in spec.formats] == ["qcow2", "raw", "vhd"]
    assert spec.compression == "none" and spec.env["DIB_DEBUG_TRACE"] == "1"
    assert spec.packages == ["curl", "htop", "vim"]
    assert spec.size == 3 * 1024**3 and spec.qemu_img_options == "compat=1.1"
    assert opts["checksum"] is True


def test_boot_test_knobs_from_the_environment() -> None:
    spec, _ = parse(["vm", "debian"], {"KILN_BOOT_FIRMWARE": "bios", "KILN_BOOT_ROOT_LOGIN": "1"})
    assert [f.value for f in spec.boot_test.firmware] == ["bios"] and spec.boot_test.root_login
    # DIB's debian brings sshd, so the root login is checked over SSH too; debian-minimal has no sshd
    assert spec.boot_test.ssh_login is True
    spec, _ = parse(["vm", "debian-minimal"], {"KILN_BOOT_ROOT_LOGIN": "1", "ELEMENTS_PATH": ""})
    assert spec.boot_test.root_login and spec.boot_test.ssh_login is False


@pytest.mark.parametrize("argv,message", [
    (["-a", "sparc", "vm", "debian"], "-a sparc: unsupported architecture"),
    (["vm", "cloud-init"], "no distribution element"),
    (["-t", "tgz", "vm", "debian"], "-t tgz: image type not supported"),
    (["--mkfs-options", "-O x", "vm", "debian"], "--mkfs-options is not supported"),
    (["--bogus", "vm", "debian"], "unrecognized arguments: --bogus"),
    ([], "required: elements"),
])
def test_unsupported_input_is_a_clear_error(argv: list[str], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse(argv, {})


def test_other_distribution_elements_pick_the_distro_and_its_base() -> None:
    ubuntu, _ = parse(["-o", "u", "ubuntu-minimal", "vm"], {"DIB_DISTRIBUTION_MIRROR": "http://u.invalid/ubuntu"})
    assert ubuntu.distro.value == "ubuntu" and ubuntu.release == "noble" and ubuntu.base is None
    centos, _ = parse(["-o", "c", "centos", "vm"], {"DIB_RELEASE": "10"})
    assert centos.distro.value == "centos" and centos.release == "10" and centos.base is not None
    with pytest.raises(SpecError, match="element fedora: set DIB_RELEASE"):
        parse(["-o", "f", "fedora", "vm"], {})


def test_rocky_and_almalinux_lines_are_taken() -> None:
    for distro in ("rocky", "almalinux"):
        spec, _ = parse(["vm", distro], {})
        assert spec.distro.value == distro and spec.release == "9" and spec.elements == ["vm", distro]


def test_two_distributions_on_one_line_are_an_error() -> None:
    with pytest.raises(SpecError, match="names two distributions"):
        parse(["vm", "debian", "ubuntu"], {})
