"""Signing SHA256SUMS: the operator's named key, or this host's development key made once in kiln's state
directory; a rewrite of the manifest signs again only what is still what was signed."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln.publish import signing
from kiln.publish.manifest import write_record
from kiln.publish.signing import SigningError
from kiln.publish.verify import verify_output
from tests.attested import kiln_state, signed_output  # noqa: F401  (a fixture)


@pytest.fixture
def operator_home(kiln_state: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:  # noqa: F811
    """A GnuPG home of the operator's with one signing key; KILN_SIGNING_KEY and KILN_GNUPGHOME name it."""
    home = Path(tempfile.mkdtemp(prefix="og-", dir="/tmp"))
    home.chmod(0o700)
    env = {"PATH": os.environ["PATH"], "GNUPGHOME": str(home)}
    subprocess.run(["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase", "", "--quick-generate-key",
                    "Image Operator <ops@example.invalid>", "ed25519", "sign", "never"], env=env, check=True,
                   capture_output=True)
    listing = subprocess.run(["gpg", "--batch", "--with-colons", "--list-secret-keys"], env=env, check=True,
                             capture_output=True, text=True).stdout
    fpr = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr"))
    monkeypatch.setenv("KILN_SIGNING_KEY", fpr)
    monkeypatch.setenv("KILN_GNUPGHOME", str(home))
    yield home, fpr
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], capture_output=True)
    shutil.rmtree(home, ignore_errors=True)


def test_the_development_key_is_made_once_in_a_private_state_directory(kiln_state: Path) -> None:  # noqa: F811
    first = signing.signer()
    assert first.development and first.home == kiln_state / "signing"
    assert stat.S_IMODE(first.home.stat().st_mode) == 0o700
    again = signing.signer()
    assert again.fingerprint == first.fingerprint


def test_a_build_is_signed_with_the_development_key_and_says_so(kiln_state: Path, tmp_path: Path) -> None:  # noqa: F811
    record = signed_output(tmp_path / "out")
    assert record.signature is not None and record.signature.development
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["signature"]["fingerprint"] == signing.signer().fingerprint
    assert manifest["signature"]["file"] == "SHA256SUMS.gpg"
    listed = (tmp_path / "out" / "SHA256SUMS").read_text()
    for name in ("deb-test.qcow2", "deb-test.spdx.json", "deb-test.cdx.json", "manifest.json"):
        assert f"  {name}\n" in listed
    assert "BEGIN PGP PUBLIC KEY BLOCK" in (tmp_path / "out" / "SHA256SUMS.key").read_text()


def test_the_operator_names_the_key(operator_home: tuple[Path, str], tmp_path: Path) -> None:
    _, fpr = operator_home
    record = signed_output(tmp_path / "out")
    assert record.signature is not None and record.signature.fingerprint == fpr and not record.signature.development
    report = verify_output(tmp_path / "out")
    assert report.signer == fpr and "KILN_SIGNING_KEY" in report.trusted
    assert not (Path(os.environ["KILN_STATE"]) / "signing").exists()  # no development key was made


def test_a_key_the_operator_names_that_is_not_there_is_bad_input(kiln_state: Path,  # noqa: F811
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_GNUPGHOME", str(kiln_state))
    monkeypatch.setenv("KILN_SIGNING_KEY", "0123456789ABCDEF0123456789ABCDEF01234567")
    with pytest.raises(SigningError, match="no such secret key") as err:
        signing.signer()
    assert err.value.exit_code == 2


def test_rewriting_the_manifest_signs_it_again(kiln_state: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "out"
    record = signed_output(out)
    record.published.append({"status": "published", "s3": []})  # what record_published adds
    write_record(record)
    assert verify_output(out).files == ["deb-test.cdx.json", "deb-test.qcow2", "deb-test.spdx.json", "manifest.json"]
    assert json.loads((out / "manifest.json").read_text())["published"]


def test_a_changed_output_is_never_signed_again(kiln_state: Path, tmp_path: Path,  # noqa: F811
                                                caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    record = signed_output(out)
    signature = (out / "SHA256SUMS.gpg").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["packages"] = manifest["packages"][1:]  # someone edits the manifest, then it is published
    (out / "manifest.json").write_text(json.dumps(manifest))
    write_record(record)
    assert (out / "SHA256SUMS.gpg").read_bytes() == signature
    assert "not signed again (manifest.json changed since it was signed)" in caplog.text
