"""qcow2 compression: the spec's choice (zstd by default, zlib, none), the qemu-img options it becomes, and a
real conversion of a small disk under each."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from kiln.image.convert import convert, convert_key, qemu_img_argv
from kiln.model.errors import SpecError
from kiln.model.spec import Compression, spec_from_dict


def test_the_default_spec_compresses_with_zstd_and_the_old_compress_field_still_reads() -> None:
    assert spec_from_dict({}, "test").compression == Compression.zstd
    assert spec_from_dict({"compression": "zlib"}, "test").compression == Compression.zlib
    assert spec_from_dict({"compress": False}, "test").compression == Compression.none
    assert spec_from_dict({"compress": True}, "test").compression == Compression.zstd
    # the command line's --compression over a spec file's old field
    assert spec_from_dict({"compress": False, "compression": "zlib"}, "test").compression == Compression.zlib


@pytest.mark.parametrize("bad", [{"compression": "lz4"}, {"compress": "yes please"}])
def test_an_unknown_compression_is_an_error_naming_the_field(bad: dict[str, object]) -> None:
    with pytest.raises(SpecError, match="compress"):
        spec_from_dict(bad, "spec.yaml")


def test_qemu_img_options() -> None:
    assert qemu_img_argv("qcow2", "zstd") == ["-f", "raw", "-O", "qcow2", "-W", "-c", "-o", "compression_type=zstd"]
    assert qemu_img_argv("qcow2", "zlib", "cluster_size=2M") == [
        "-f", "raw", "-O", "qcow2", "-W", "-c", "-o", "compression_type=zlib,cluster_size=2M"]
    # the spec's own compression_type wins; none writes a plain qcow2; other formats are never compressed
    assert qemu_img_argv("qcow2", "zstd", "compression_type=zlib")[-2:] == ["-o", "compression_type=zlib"]
    assert "-c" not in qemu_img_argv("qcow2", "none") and "-o" not in qemu_img_argv("qcow2", "none")
    assert qemu_img_argv("vmdk", "zstd") == ["-f", "raw", "-O", "vmdk", "-W"]
    # a changed compression is another image; for raw, compression changes nothing
    assert convert_key("p", "qcow2", "zstd") != convert_key("p", "qcow2", "zlib") != convert_key("p", "qcow2", "none")
    assert convert_key("p", "raw", "zstd") == convert_key("p", "raw", "none")


@pytest.mark.timeout(60)
def test_a_real_disk_compressed_each_way(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as f:  # 64 MiB: 4 MiB of noise, 16 MiB of text, the rest a hole
        f.write(os.urandom(4 << 20))
        f.seek(20 << 20)
        f.write(b"kiln compresses this line\n" * ((16 << 20) // 26))
        f.truncate(64 << 20)
    sizes = {}
    for kind in ("none", "zlib", "zstd"):
        out = convert(raw, tmp_path / f"{kind}.qcow2", "qcow2", compression=kind)
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(out)], capture_output=True,
                                         text=True, check=True).stdout)
        assert info["format-specific"]["data"]["compression-type"] == ("zstd" if kind == "zstd" else "zlib")
        # the compressed images hold the same disk
        subprocess.run(["qemu-img", "compare", "-q", str(raw), str(out)], check=True)
        sizes[kind] = out.stat().st_size
        assert not (tmp_path / f"{kind}.qcow2.partial").exists()
    assert sizes["zstd"] < sizes["none"] / 2 and sizes["zlib"] < sizes["none"] / 2, sizes
