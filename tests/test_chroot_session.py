"""kiln.host.chroot.ChrootSession's temporary files (/etc/resolv.conf, policy-rc.d): put in for the hook, taken out
after it, unless the hook made the file its own (a resolver package linking resolv.conf to its stub)."""

from __future__ import annotations

import os
from pathlib import Path

from kiln.host.chroot import ChrootSession


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "usr/sbin").mkdir(parents=True)
    return root


def test_the_trees_own_resolv_conf_comes_back_after_an_untouched_session(tmp_path: Path) -> None:
    root = _root(tmp_path)
    (root / "etc/resolv.conf").symlink_to("../run/elsewhere.conf")
    with ChrootSession(root, tmp_path / "journal"):
        assert not (root / "etc/resolv.conf").is_symlink()  # the host's, for apt
    assert os.readlink(root / "etc/resolv.conf") == "../run/elsewhere.conf"
    assert not (root / "usr/sbin/policy-rc.d").exists()
    assert not list((root / "etc").glob("*.kiln-aside"))


def test_what_a_hook_makes_of_resolv_conf_stays(tmp_path: Path) -> None:
    root = _root(tmp_path)
    (root / "etc/resolv.conf").write_text("nameserver 192.0.2.1\n")
    with ChrootSession(root, tmp_path / "journal"):
        (root / "etc/resolv.conf").unlink()
        (root / "etc/resolv.conf").symlink_to("../run/systemd/resolve/stub-resolv.conf")  # what resolved does
    assert os.readlink(root / "etc/resolv.conf") == "../run/systemd/resolve/stub-resolv.conf"
    assert not list((root / "etc").glob("*.kiln-aside"))


def test_a_resolv_conf_kiln_created_goes_unless_a_hook_rewrote_it(tmp_path: Path) -> None:
    root = _root(tmp_path)
    with ChrootSession(root, tmp_path / "journal"):
        pass
    assert not (root / "etc/resolv.conf").exists()
    with ChrootSession(root, tmp_path / "journal"):
        (root / "etc/resolv.conf").write_text("nameserver 127.0.0.53\n")
    assert (root / "etc/resolv.conf").read_text() == "nameserver 127.0.0.53\n"


def test_a_tree_whose_dev_or_etc_is_a_symlink_to_the_host_is_refused(tmp_path: Path) -> None:
    """`dev -> /dev` or `etc -> /etc` in a hostile tree would have kiln mount over, or move aside, the host's
    own: refused before anything is mounted or moved (stand-ins for the host's directories here)."""
    import pytest

    from kiln.host.mounts import mounted_targets
    from kiln.model.errors import MountError

    host_dev, host_etc = tmp_path / "host-dev", tmp_path / "host-etc"
    host_dev.mkdir()
    host_etc.mkdir()
    (host_etc / "resolv.conf").write_text("nameserver 192.0.2.53\n")
    for link, target in (("dev", host_dev), ("etc", host_etc)):
        root = _root(tmp_path / link)
        if link == "etc":
            (root / "etc").rmdir()
        (root / link).symlink_to(target)
        with pytest.raises(MountError, match=f"the root tree's /{link} is a symlink"), \
                ChrootSession(root, tmp_path / link / "journal"):
            pass
        assert not any(t.startswith(str(tmp_path)) for t in mounted_targets())
    assert (host_etc / "resolv.conf").read_text() == "nameserver 192.0.2.53\n"
    assert list(host_etc.iterdir()) == [host_etc / "resolv.conf"] and list(host_dev.iterdir()) == []
