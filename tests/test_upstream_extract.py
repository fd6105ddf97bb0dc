"""kiln.extract, and the whole upstream path: served image -> pinned digest -> download -> root tree.

Disk images are mounted read-only through loop devices (root needed); every test here checks that
no mount and no loop device outlives it.
"""

from __future__ import annotations

import lzma
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.host.mounts import MountStack, reclaim
from kiln.host.run import run
from kiln.sources.download import RetryPolicy
from kiln.sources.extract import BaseFormat, ExtractError, extract_rootfs, parse_fstab, read_os_release
from kiln.sources.partitions import (
    ESP,
    LINUX_DATA,
    LVM,
    ROOT_TYPES,
    SWAP,
    Partition,
    mount_partition,
    read_partitions,
    root_candidates,
)
from kiln.sources.upstream import (
    BaseSpec,
    ResolvedBase,
    base_key_fields,
    fetch_image,
    image_path,
    pin_base,
    resolve_base,
)
from kiln.sources.verify import ChecksumMismatchError, SignatureError
from tests import upstream_fixtures as uf

FAST = RetryPolicy(attempts=2, backoff=0.01)
NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a disk image needs root")
# what mkfs.ext4 adds to each filesystem, and the FAT ESP, which has no owners or modes to compare
DISK_SKIP = ("lost+found", "boot/lost+found")
FAT = ("boot/efi",)


@pytest.fixture(autouse=True)
def no_leaks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    base = tmp_path_factory.getbasetemp()
    assert uf.mounts_and_loops(base) == []
    yield
    assert uf.mounts_and_loops(base) == [], "a mount or a loop device outlived the test"


def _compare(expected: Path, actual: Path, *, disk: bool, skip: tuple[str, ...] | None = None) -> None:
    skip = skip if skip is not None else DISK_SKIP if disk else ()
    content_only = FAT if disk else ()
    want = uf.snapshot(expected, content_only=content_only)
    got = uf.snapshot(actual, skip=skip, content_only=content_only)
    assert len(want) > 20
    diff = {k: (want.get(k), got.get(k)) for k in set(want) | set(got) if want.get(k) != got.get(k)}
    assert not diff, f"trees differ: {diff}"
    assert want["<hardlinks>"] == [["usr/bin/hello", "usr/bin/hello-again"]]


# ---------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("name", ["root.tar.xz", "root.tar.zst", "root.squashfs"])
def test_archives_extract_with_owners_modes_xattrs_links_and_devices(published: uf.Published, tmp_path: Path,
                                                                     name: str) -> None:
    result = extract_rootfs(published.files[name], tmp_path / "tree", workdir=tmp_path / "work")
    assert result.format is (BaseFormat.squashfs if name.endswith("squashfs") else BaseFormat.tar)
    assert result.os_release["ID"] == "kilntest"
    _compare(published.full, tmp_path / "tree", disk=False)


@NEEDS_ROOT
def test_qcow2_disk_extracts_root_boot_and_esp(published: uf.Published, tmp_path: Path) -> None:
    work = tmp_path / "work"
    result = extract_rootfs(published.files["disk.qcow2"], tmp_path / "tree", workdir=work, format="qcow2")
    assert result.format is BaseFormat.qcow2
    assert result.root is not None and result.root.number == 3 and result.root.fstype == "ext4"
    assert result.root.fs_uuid == uf.ROOT_UUID
    assert result.grafted == ("/boot", "/boot/efi")
    _compare(published.full, tmp_path / "tree", disk=True)
    assert not (work / "extract").exists(), "the raw conversion and the mount points are cleaned up"
    assert not (work / "mounts.json").exists() or (work / "mounts.json").read_text() == "[]"


@NEEDS_ROOT
def test_raw_disk_is_recognised_by_content(published: uf.Published, tmp_path: Path) -> None:
    raw = tmp_path / "disk.img"  # a raw disk under a name that suggests qcow2
    run(["qemu-img", "convert", "-O", "raw", str(published.files["disk.qcow2"]), str(raw)], quiet=True)
    result = extract_rootfs(raw, tmp_path / "tree", workdir=tmp_path / "work")
    assert result.format is BaseFormat.raw
    _compare(published.full, tmp_path / "tree", disk=True)


@NEEDS_ROOT
def test_a_bare_filesystem_without_partition_table(published: uf.Published, tmp_path: Path) -> None:
    raw = tmp_path / "rootfs.raw"
    with open(raw, "wb") as fh:
        fh.truncate(64 << 20)
    run(["mkfs.ext4", "-q", "-F", "-d", str(published.full), str(raw)], quiet=True)
    result = extract_rootfs(raw, tmp_path / "tree", workdir=tmp_path / "work", format="raw")
    assert result.root is not None and result.root.number == 0
    # the fstab's /boot and ESP are not on this disk: nothing is grafted, the tree is complete anyway
    assert result.grafted == ()
    _compare(published.full, tmp_path / "tree", disk=False, skip=("lost+found",))


def test_extraction_refuses_a_non_empty_target_and_a_wrong_declared_format(published: uf.Published,
                                                                           tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree/leftover").write_text("x")
    with pytest.raises(ExtractError, match="not empty"):
        extract_rootfs(published.files["root.tar.xz"], tmp_path / "tree", workdir=tmp_path / "work")
    with pytest.raises(ExtractError, match="declared squashfs but is a qcow2"):
        extract_rootfs(published.files["disk.qcow2"], tmp_path / "t2", workdir=tmp_path / "work", format="squashfs")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\0" * 10240)
    with pytest.raises(ExtractError, match=r"no etc/os-release"):
        extract_rootfs(junk, tmp_path / "t3", workdir=tmp_path / "work")


# ---------------------------------------------------------------------------------------------- root choice


def _p(n: int, type_: str, size: int, fstype: str = "ext4", label: str = "", name: str = "") -> Partition:
    return Partition(n, n << 20, size << 20, type=type_, fstype=fstype, label=label, name=name)


def test_root_partition_by_type_then_label_then_size() -> None:
    esp, swap = _p(1, ESP, 100, "vfat"), _p(2, SWAP, 900, "swap")
    big_data, small_root = _p(3, LINUX_DATA, 5000), _p(4, ROOT_TYPES["amd64"], 2000)
    labelled = _p(5, LINUX_DATA, 1000, label="cloudimg-rootfs")
    assert [p.number for p in root_candidates([esp, swap, big_data, small_root, labelled], "amd64")] == [4, 5, 3]
    assert [p.number for p in root_candidates([esp, big_data, labelled], "amd64")] == [5, 3]
    assert [p.number for p in root_candidates([esp, big_data, _p(6, LINUX_DATA, 9000)], "amd64")] == [6, 3]
    # an MBR disk: 83 is Linux, 82 swap, ef an ESP
    mbr = [_p(1, "EF", 100, "vfat"), _p(2, "83", 3000, "xfs"), _p(3, "82", 4000, "swap")]
    assert [p.number for p in root_candidates(mbr, "amd64")] == [2]
    assert root_candidates([_p(1, LVM, 5000, "LVM2_member")], "amd64") == []


def test_fstab_and_os_release_parsing(tmp_path: Path) -> None:
    entries = parse_fstab("# c\nUUID=abc / btrfs subvol=root,compress=zstd:1 0 0\nLABEL=boot /boot ext4 defaults\n")
    assert [(e.mountpoint, e.option("subvol")) for e in entries] == [("/", "root"), ("/boot", None)]
    (tmp_path / "etc").mkdir()
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "usr/lib/os-release").write_text('ID=x\nPRETTY_NAME="X 1"\n')
    (tmp_path / "etc/os-release").symlink_to("/usr/lib/os-release")  # absolute: inside the tree, not the host's
    assert read_os_release(tmp_path) == {"ID": "x", "PRETTY_NAME": "X 1"}


# ---------------------------------------------------------------------------------------------- end to end


def _resolve(server: uf.FixtureServer, published: uf.Published, case: str, image: str, **kw: object) -> ResolvedBase:
    fields: dict[str, object] = {"url": server.url(f"{case}/{image}"),
                                 "checksum_url": server.url(f"{case}/SHA256SUMS"),
                                 "signature_url": server.url(f"{case}/SHA256SUMS.gpg"),
                                 "keyring": published.key.armored}
    fields.update(kw)
    return resolve_base(BaseSpec.model_validate(fields), distro="ubuntu", release="noble", arch="amd64")


def _fetch_and_extract(server: uf.FixtureServer, published: uf.Published, tmp_path: Path, case: str,
                       image: str) -> tuple[Path, dict[str, object]]:
    resolved = _resolve(server, published, case, image, fingerprints=[published.key.fingerprint])
    pinned = pin_base(resolved, tmp_path / "work", retry=FAST)
    key = base_key_fields(pinned)
    fetched = fetch_image(pinned, tmp_path / "downloads", retry=FAST, progress=False)
    tree = tmp_path / "tree"
    extract_rootfs(fetched.path, tree, workdir=tmp_path / "work", format=pinned.base.format, arch=pinned.base.arch)
    return tree, key


@NEEDS_ROOT
@pytest.mark.parametrize("image", ["root.tar.xz", "disk.qcow2"])
def test_a_good_upstream_image_verifies_and_extracts(server: uf.FixtureServer, published: uf.Published,
                                                     tmp_path: Path, image: str) -> None:
    tree, key = _fetch_and_extract(server, published, tmp_path, "good", image)
    _compare(published.full, tree, disk=image.endswith("qcow2"))
    assert str(key["digest"]).startswith("sha256:")


def _nothing_cached(tmp_path: Path) -> None:
    downloads = tmp_path / "downloads"
    left = [p for p in downloads.rglob("*") if p.is_file() and not p.name.endswith(".lock")] if downloads.exists() \
        else []
    assert left == [], f"a failed verification left {left}"
    assert not (tmp_path / "tree").exists()


def test_a_tampered_image_fails_and_leaves_nothing(server: uf.FixtureServer, published: uf.Published,
                                                   tmp_path: Path) -> None:
    case = published.case("bad-image", "disk.qcow2", "SHA256SUMS", "SHA256SUMS.gpg")
    with open(case / "disk.qcow2", "r+b") as fh:
        fh.seek(1 << 16)
        fh.write(b"\xff" * 16)
    with pytest.raises(ChecksumMismatchError, match=r"disk.qcow2.*does not match its checksum"):
        _fetch_and_extract(server, published, tmp_path, "bad-image", "disk.qcow2")
    _nothing_cached(tmp_path)


def test_a_tampered_checksum_file_fails_and_leaves_nothing(server: uf.FixtureServer, published: uf.Published,
                                                           tmp_path: Path) -> None:
    case = published.case("bad-sums", "disk.qcow2", "SHA256SUMS", "SHA256SUMS.gpg")
    # the attacker swaps the image and lists its digest: the signature no longer matches
    evil = case / "disk.qcow2"
    evil.write_bytes(evil.read_bytes()[:-512] + b"\0" * 512)
    sums = (case / "SHA256SUMS").read_text().splitlines()
    digest = uf._sha256(evil)
    (case / "SHA256SUMS").write_text("\n".join(
        f"{digest}  disk.qcow2" if line.endswith("disk.qcow2") else line for line in sums) + "\n")
    with pytest.raises(SignatureError, match="BAD signature"):
        _fetch_and_extract(server, published, tmp_path, "bad-sums", "disk.qcow2")
    assert not server.seen("bad-sums/disk.qcow2"), "the image is not even downloaded"
    _nothing_cached(tmp_path)


def test_a_signature_by_another_key_fails_and_leaves_nothing(server: uf.FixtureServer, published: uf.Published,
                                                             tmp_path: Path) -> None:
    case = published.case("bad-sig", "root.tar.xz", "SHA256SUMS")
    published.attacker.sign(case / "SHA256SUMS", case / "SHA256SUMS.gpg")
    published.attacker.stop()
    with pytest.raises(SignatureError, match="in none of the trusted keyrings"):
        _fetch_and_extract(server, published, tmp_path, "bad-sig", "root.tar.xz")
    _nothing_cached(tmp_path)


def test_the_download_cache_is_keyed_by_digest(server: uf.FixtureServer, published: uf.Published,
                                               tmp_path: Path) -> None:
    pinned = pin_base(_resolve(server, published, "good", "root.tar.xz"), tmp_path / "work", retry=FAST)
    first = fetch_image(pinned, tmp_path / "downloads", retry=FAST, progress=False)
    assert first.path == image_path(pinned, tmp_path / "downloads")
    assert pinned.digest.hexdigest[:32] in str(first.path)
    second = fetch_image(pinned, tmp_path / "downloads", retry=FAST, progress=False)
    assert second.reused


@NEEDS_ROOT
def test_a_killed_extraction_is_reclaimed(published: uf.Published, tmp_path: Path) -> None:
    """What a SIGKILL between mount and unmount leaves, `kiln.host.mounts.reclaim(workdir)` removes."""
    raw = tmp_path / "disk.raw"
    run(["qemu-img", "convert", "-O", "raw", str(published.files["disk.qcow2"]), str(raw)], quiet=True)
    root = next(p for p in read_partitions(raw) if p.number == 3)
    stack = MountStack(tmp_path / "work")
    mount_partition(stack, raw, root, tmp_path / "work/extract/mnt/p3")
    stack.targets.clear()  # as if the process died: only the journal knows
    assert reclaim(tmp_path / "work") == [str(tmp_path / "work/extract/mnt/p3")]
    shutil.rmtree(tmp_path / "work")


# ---------------------------------------------------------------------------------------------- xfs, btrfs


def _have(tool: str) -> bool:
    return shutil.which(tool) is not None


def _fs_disk(published: uf.Published, tmp_path: Path, fstype: str) -> Path:
    """A GPT disk whose one partition holds the tree on `fstype`, filled through a read-write loop mount;
    for btrfs laid out as Fedora does: subvolumes `root` and `home`, the fstab naming them."""
    fs = tmp_path / f"{fstype}.fs"
    with open(fs, "wb") as fh:
        fh.truncate(320 << 20)  # xfs wants at least 300 MiB
    uuid = "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"
    run([f"mkfs.{fstype}", "-q", "-f", *(["-m", f"uuid={uuid}"] if fstype == "xfs" else ["-U", uuid]), str(fs)],
        quiet=True)
    with MountStack(tmp_path / "fill-journal") as stack:
        top = stack.mount(["-o", "loop", str(fs)], tmp_path / "fill", what=f"fill the {fstype} fixture")
        dest = top
        if fstype == "btrfs":
            for sub in ("root", "home"):
                run(["btrfs", "-q", "subvolume", "create", str(top / sub)], quiet=True)
            dest = top / "root"
        run(["cp", "-a", f"{published.full}/.", f"{dest}/"], quiet=True)
        if fstype == "btrfs":
            (top / "home/user").mkdir()
            (top / "home/user/.profile").write_text("# in the home subvolume\n")
            (dest / "etc/fstab").write_text(
                f"UUID={uuid} / btrfs subvol=root,compress=zstd:1 0 0\nUUID={uuid} /home btrfs subvol=home 0 0\n")
        else:
            (dest / "etc/fstab").write_text(f"UUID={uuid} / xfs defaults 0 0\n")
    disk = tmp_path / f"{fstype}.raw"
    with open(disk, "wb") as fh:
        fh.truncate((1 << 20) + fs.stat().st_size + (1 << 20))
    run(["sgdisk", "--new=1:2048:+320M", "--typecode=1:8304", str(disk)], quiet=True)
    with open(fs, "rb") as src, open(disk, "r+b") as dst:
        dst.seek(1 << 20)
        shutil.copyfileobj(src, dst, 4 << 20)
    fs.unlink()
    return disk


@NEEDS_ROOT
@pytest.mark.parametrize("fstype", ["xfs", "btrfs"])
def test_xfs_and_btrfs_subvolume_roots(published: uf.Published, tmp_path: Path, fstype: str) -> None:
    if not _have(f"mkfs.{fstype}"):
        pytest.skip(f"mkfs.{fstype} is not installed")
    disk = _fs_disk(published, tmp_path, fstype)
    result = extract_rootfs(disk, tmp_path / "tree", workdir=tmp_path / "work", format="raw")
    assert result.root is not None and result.root.fstype == fstype
    tree = tmp_path / "tree"
    if fstype == "btrfs":
        assert result.subvolume == "root" and result.grafted == ("/home",)
        assert (tree / "home/user/.profile").read_text() == "# in the home subvolume\n"
        skip: tuple[str, ...] = ("etc/fstab", "home")
    else:
        skip = ("etc/fstab",)
    want = uf.snapshot(published.full, skip=("etc/fstab",))
    got = uf.snapshot(tree, skip=skip)
    assert {k: v for k, v in got.items() if k != "home"} == {k: v for k, v in want.items() if k != "home"}


@NEEDS_ROOT
@pytest.mark.parametrize("name", ["disk.qcow2.xz", "disk.raw.zst"])
def test_compressed_disk_images_are_decompressed_first(published: uf.Published, tmp_path: Path, name: str) -> None:
    image = tmp_path / name
    if name.endswith(".xz"):
        with open(published.files["disk.qcow2"], "rb") as src, lzma.open(image, "wb", preset=0) as dst:
            shutil.copyfileobj(src, dst)
    else:
        raw = tmp_path / "disk.raw"
        run(["qemu-img", "convert", "-O", "raw", str(published.files["disk.qcow2"]), str(raw)], quiet=True)
        run(["zstd", "-q", "-1", "--rm", "-o", str(image), str(raw)], quiet=True)
    result = extract_rootfs(image, tmp_path / "tree", workdir=tmp_path / "work")
    assert result.format is (BaseFormat.qcow2 if "qcow2" in name else BaseFormat.raw)
    _compare(published.full, tmp_path / "tree", disk=True)
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) in ([], ["mounts.json"])


@pytest.mark.parametrize("kind", ["backing file", "external data file"])
def test_a_qcow2_naming_a_host_file_is_refused_before_anything_reads_it(published: uf.Published, tmp_path: Path,
                                                                        kind: str) -> None:
    """A hostile upstream qcow2 that is only a thin header over a file on the build host (here a real disk
    with an OS on it, standing in for a host disk): converting it would copy the host file's contents into
    the image kiln builds and publishes. It is refused, naming the file, and nothing is extracted."""
    host_disk = tmp_path / "host-disk.qcow2"
    shutil.copyfile(published.files["disk.qcow2"], host_disk)
    evil = tmp_path / "evil.qcow2"
    if kind == "backing file":
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(host_disk), "-F", "qcow2", str(evil)])
        named = str(host_disk)
    else:
        host_raw = tmp_path / "host-disk.raw"
        run(["qemu-img", "convert", "-O", "raw", str(host_disk), str(host_raw)])
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={host_raw},data_file_raw=on",
             str(evil), str(host_raw.stat().st_size)])
        named = str(host_raw)
    tree = tmp_path / "tree"
    with pytest.raises(ExtractError, match=f"names an? {kind}.*{named}.*refused"):
        extract_rootfs(evil, tree, workdir=tmp_path / "work", format="qcow2")
    assert not tree.exists() or list(tree.iterdir()) == []
    assert not (tmp_path / "work" / "extract").exists()
