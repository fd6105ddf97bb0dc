"""`kiln verify OUTPUT`: passes on a good output; on anything changed, one line naming the file, exit code 1."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from kiln.cli.main import main
from kiln.publish.verify import VerifyError, verify_output
from tests.attested import kiln_state, signed_output  # noqa: F401  (a fixture)

pytestmark = pytest.mark.usefixtures("kiln_state")


@pytest.fixture
def out(tmp_path: Path) -> Path:
    signed_output(tmp_path / "out")
    return tmp_path / "out"


def _verify_cli(out: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(["verify", str(out), *extra])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _flip(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _resum(out: Path, lines: str) -> None:
    """Rewrite SHA256SUMS (its signature then no longer matches, unless the test re-signs)."""
    (out / "SHA256SUMS").write_text(lines)


def test_a_good_output_verifies(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, stdout, _ = _verify_cli(out, capsys=capsys)
    assert rc == 0, stdout
    assert "verified" in stdout and "by " in stdout and "development key" in stdout
    assert "deb-test.spdx.json (spdx-2.3): valid, lists the manifest's 6 packages" in stdout
    rc, stdout, _ = _verify_cli(out, "--json", capsys=capsys)
    report = json.loads(stdout)
    assert rc == 0 and report["verified"] and report["packages"] == 6 and "manifest.json" in report["files"]


def test_a_flipped_byte_in_the_image_names_the_image(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _flip(out / "deb-test.qcow2")
    rc, stdout, stderr = _verify_cli(out, capsys=capsys)
    assert rc == 1 and stdout == ""
    [line] = stderr.strip().splitlines()
    assert line == f"kiln: error: {out / 'deb-test.qcow2'}: its sha256 differs from SHA256SUMS's: the file changed " \
                   "after it was signed"


@pytest.mark.parametrize("name", ["deb-test.spdx.json", "deb-test.cdx.json", "manifest.json"])
def test_a_flipped_byte_in_an_sbom_or_the_manifest_names_it(out: Path, name: str) -> None:
    _flip(out / name, offset=30)
    with pytest.raises(VerifyError, match=rf"^{out / name}: its sha256 differs"):
        verify_output(out)


def test_a_missing_file_is_named(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (out / "deb-test.cdx.json").unlink()
    rc, _, stderr = _verify_cli(out, capsys=capsys)
    assert rc == 1 and f"{out / 'deb-test.cdx.json'}: missing (listed in SHA256SUMS)" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("name", ["other.raw", "OTHER.QCOW2", "other.qcow2.zst"])
def test_an_extra_unlisted_image_is_named(out: Path, name: str) -> None:
    (out / name).write_bytes(b"\0" * 4096)
    with pytest.raises(VerifyError, match=rf"^{out / name}: not listed in SHA256SUMS"):
        verify_output(out)


def test_a_subdirectory_is_reported_as_not_signed(out: Path) -> None:
    (out / "extra").mkdir()
    assert "extra/" in verify_output(out).not_covered


def test_a_console_log_beside_the_images_need_not_be_signed(out: Path) -> None:
    (out / "boot-qemu-bios-console.log").write_text("login:\n")
    assert verify_output(out).not_covered == ["boot-qemu-bios-console.log"]


def test_a_changed_sha256sums_has_a_bad_signature(out: Path) -> None:
    image = out / "deb-test.qcow2"
    _flip(image)
    sums = (out / "SHA256SUMS").read_text().splitlines()
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    _resum(out, "".join(f"{digest}  {line.split()[1]}\n" if line.endswith("qcow2") else line + "\n"
                        for line in sums))
    with pytest.raises(VerifyError, match=rf"^{out / 'SHA256SUMS.gpg'}: BAD signature"):
        verify_output(out)


def test_a_signature_by_another_key_is_refused_even_with_that_key_shipped(out: Path, tmp_path: Path) -> None:
    """Whoever changed the files can sign them with a key of their own and ship it as SHA256SUMS.key."""
    home = tmp_path / "g"
    home.mkdir(mode=0o700)
    env = {"PATH": os.environ["PATH"], "GNUPGHOME": str(home)}
    gpg = ["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase", ""]
    subprocess.run([*gpg, "--quick-generate-key", "Mallory <m@example.invalid>", "ed25519", "sign", "never"],
                   env=env, check=True, capture_output=True)
    _flip(out / "deb-test.qcow2")
    digest = hashlib.sha256((out / "deb-test.qcow2").read_bytes()).hexdigest()
    _resum(out, "".join(f"{digest}  deb-test.qcow2\n" if line.endswith("qcow2") else line + "\n"
                        for line in (out / "SHA256SUMS").read_text().splitlines()))
    subprocess.run([*gpg, "--yes", "--output", str(out / "SHA256SUMS.gpg"), "--detach-sign", str(out / "SHA256SUMS")],
                   env=env, check=True, capture_output=True)
    key = subprocess.run(["gpg", "--batch", "--armor", "--export"], env=env, check=True, capture_output=True).stdout
    (out / "SHA256SUMS.key").write_bytes(key)
    subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, capture_output=True)
    with pytest.raises(VerifyError, match=r"SHA256SUMS\.gpg: signed by [0-9A-F]+, which is in none of the trusted"):
        verify_output(out)
    # trusting the shipped key takes a fingerprint: the operator's, which Mallory's is not
    mine = json.loads((out / "manifest.json").read_text())["signature"]["fingerprint"]
    with pytest.raises(VerifyError, match=r"SHA256SUMS\.gpg"):
        verify_output(out, key=mine)


def test_the_output_own_key_counts_only_when_a_fingerprint_pins_it(out: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    fpr = json.loads((out / "manifest.json").read_text())["signature"]["fingerprint"]
    monkeypatch.setenv("KILN_STATE", str(tmp_path / "elsewhere"))  # another host: no development key here
    with pytest.raises(VerifyError, match="no key to trust") as err:
        verify_output(out)
    assert err.value.exit_code == 2
    report = verify_output(out, key=fpr)
    assert report.signer == fpr and "--key" in report.trusted
    assert verify_output(out, keyring=out / "SHA256SUMS.key").signer == fpr
    with pytest.raises(VerifyError, match="not a full OpenPGP fingerprint"):
        verify_output(out, key="1234")


def test_a_symlink_in_the_output_is_refused(out: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere.txt").write_text("x")
    os.symlink(tmp_path / "elsewhere.txt", out / "notes.txt")
    with pytest.raises(VerifyError, match=rf"^{out / 'notes.txt'}: a symbolic link in the output: refused"):
        verify_output(out)


def test_a_listed_file_that_is_a_symlink_is_not_followed(out: Path, tmp_path: Path) -> None:
    image = out / "deb-test.qcow2"
    moved = tmp_path / "moved.qcow2"
    image.rename(moved)
    os.symlink(moved, image)  # the same bytes, through a link: still refused
    with pytest.raises(VerifyError, match=rf"^{image}: cannot open: .*a link is never followed"):
        verify_output(out)


@pytest.mark.parametrize("name", ["../etc/passwd", "sub/file", ".."])
def test_a_sha256sums_line_leaving_the_output_is_refused(out: Path, name: str) -> None:
    # signed with the trusted key, as a compromised build could: the names are still refused
    from kiln.publish.signing import sign_detached, signer

    _resum(out, (out / "SHA256SUMS").read_text() + f"{'0' * 64}  {name}\n")
    sign_detached(signer(), out / "SHA256SUMS", out / "SHA256SUMS.gpg", out / "SHA256SUMS.key")
    with pytest.raises(VerifyError, match=r"SHA256SUMS:5: .* is not a plain file name in the output"):
        verify_output(out)


def test_an_sbom_that_drops_a_package_is_named_even_when_signed(out: Path) -> None:
    """A build whose SBOM does not list the manifest's packages fails on the SBOM, not on its checksum."""
    from kiln.model.record import BuildRecord
    from kiln.publish.manifest import write_record
    from kiln.publish.sbom import write_sboms
    from tests.attested import PACKAGES, image_facts

    record = BuildRecord.load(out)
    record.sboms = write_sboms(out, PACKAGES[1:], image_facts(sha256=record.images[0].sha256))
    write_record(record, seal=True)
    with pytest.raises(VerifyError, match=rf"^{out / 'deb-test.spdx.json'}: lists 5 packages, the manifest 6"):
        verify_output(out)


def test_a_directory_that_is_not_an_output_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, stderr = _verify_cli(tmp_path / "nothing", capsys=capsys)
    assert rc == 2 and "nothing: No such file or directory" in stderr
    (tmp_path / "empty").mkdir()
    rc, _, stderr = _verify_cli(tmp_path / "empty", capsys=capsys)
    assert rc == 1 and "SHA256SUMS: missing: not a signed kiln output" in stderr
