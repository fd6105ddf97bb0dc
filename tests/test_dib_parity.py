"""kiln's distribution elements give at least what diskimage-builder's elements of the same name give:
the expectation is derived from DIB's own element files by DIB's own code (tests/dib_parity.py)."""

from __future__ import annotations

import pytest

from kiln.cli.dib import DISTRO_ELEMENTS
from tests import dib_parity


@pytest.mark.parametrize("element", list(dib_parity.NATIVE))
def test_native_distro_element_gives_what_dibs_gives(element: str) -> None:
    p = dib_parity.parity(element)
    assert p.dib_packages, "nothing derived from DIB's files: the derivation is broken"
    assert p.missing_elements == [], f"{element}: DIB's element-deps kiln does not give: {p.missing_elements}"
    assert p.missing_packages == [], f"{element}: DIB's packages kiln does not install: {p.missing_packages}"


def test_the_derivation_sees_what_dibs_debian_installs() -> None:
    dib_elements, dib_packages = dib_parity.dib_side("debian", "debian", "bookworm")
    assert {"debian-minimal", "openssh-server", "sysprep"} <= set(dib_elements)
    assert {"openssh-server", "cloud-init", "cloud-initramfs-growroot", "locales"} <= set(dib_packages)
    # pkg-map applied: debootstrap's cloud-initramfs-growroot maps to nothing for bookworm's debian-minimal
    assert "cloud-initramfs-growroot" not in dib_parity.dib_side("debian-minimal", "debian", "bookworm")[1]


def test_every_distribution_element_kiln_ships_is_compared_or_said_why_not() -> None:
    assert set(DISTRO_ELEMENTS) == set(dib_parity.NATIVE) | set(dib_parity.NOT_COMPARED)


def test_the_docs_table_is_the_one_the_code_derives() -> None:
    assert dib_parity.doc_table() == dib_parity.table(), "run: python -m tests.dib_parity --write"


@pytest.mark.parametrize(("release", "stack"), [
    ("bookworm", {"ifupdown", "isc-dhcp-client"}), ("bullseye", {"ifupdown", "isc-dhcp-client"}),
    ("trixie", {"netplan.io", "systemd-resolved"}), ("sid", {"netplan.io", "systemd-resolved"}),
    # a private archive's own suite name (the refresh and fleet tests use some): the stack every archive has
    ("kilnone", {"ifupdown", "isc-dhcp-client"}),
])
def test_the_debian_base_network_stack_by_release(release: str, stack: set[str]) -> None:
    _, packages = dib_parity.kiln_side("debian-minimal", "debian", release)
    network = {"ifupdown", "isc-dhcp-client", "netplan.io", "systemd-resolved"}
    assert network & set(packages) == stack
