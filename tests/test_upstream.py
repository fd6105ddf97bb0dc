"""kiln.upstream and kiln.verify: the base: block, the per-distro data, checksum files and signatures."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from pydantic import ValidationError

from kiln.model.errors import SpecError
from kiln.sources.extract import BaseFormat, guess_format
from kiln.sources.upstream import (
    UPSTREAMS,
    BaseSpec,
    PinnedBase,
    ResolvedBase,
    Signing,
    base_key_fields,
    find_keyrings,
    pin_base,
    resolve_base,
)
from kiln.sources.verify import (
    ChecksumFileError,
    Digest,
    SignatureError,
    UnsignedChecksumError,
    VerificationError,
    dearmor,
    parse_checksum_file,
    verify_signature,
)
from tests import upstream_fixtures as uf

SHA256 = "a" * 64
SHA512 = "b" * 128


# ---------------------------------------------------------------------------------------------- the base: block


def test_base_spec_rejects_unknown_fields_and_is_frozen() -> None:
    with pytest.raises(ValidationError, match="extra"):
        BaseSpec.model_validate({"urls": "https://example.invalid/x.qcow2"})
    spec = BaseSpec()
    with pytest.raises(ValidationError):
        spec.insecure_skip_signature = True  # type: ignore[misc]


def test_base_spec_url_needs_a_checksum_source_and_a_known_format() -> None:
    with pytest.raises(ValidationError, match="checksum_url"):
        BaseSpec(url="https://example.invalid/img.qcow2")
    with pytest.raises(ValidationError, match="cannot tell the format"):
        BaseSpec(url="https://example.invalid/image.bin", checksum=f"sha256:{SHA256}")
    ok = BaseSpec(url="https://example.invalid/image.bin", checksum=f"sha256:{SHA256}", format=BaseFormat.raw)
    assert ok.format is BaseFormat.raw


def test_base_spec_checksum_is_normalized_and_validated() -> None:
    spec = BaseSpec(url=["https://a.invalid/x.tar.xz", "https://b.invalid/x.tar.xz"],
                    checksum=f"SHA256:{SHA256.upper()}")
    assert spec.checksum == f"sha256:{SHA256}"
    for bad in ("md5:abcd", f"sha256:{SHA256[:-1]}", SHA256, f"sha512:{SHA256}"):
        with pytest.raises(ValidationError):
            BaseSpec(url="https://a.invalid/x.tar.xz", checksum=bad)


def test_base_spec_rejects_contradictions() -> None:
    with pytest.raises(ValidationError, match="either checksum"):
        BaseSpec(url="https://a.invalid/x.qcow2", checksum=f"sha512:{SHA512}", checksum_url="https://a.invalid/SUMS")
    with pytest.raises(ValidationError, match="contradict"):
        BaseSpec(signature_url="https://a.invalid/SUMS.gpg", insecure_skip_signature=True)
    with pytest.raises(ValidationError, match="unknown upstream"):
        BaseSpec(source="gentoo")
    with pytest.raises(ValidationError, match="not an http"):
        BaseSpec(url="ftp://a.invalid/x.qcow2", checksum=f"sha256:{SHA256}")
    with pytest.raises(ValidationError, match="fingerprint"):
        BaseSpec(fingerprints=["1234"])


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("noble-server-cloudimg-amd64-root.tar.xz", BaseFormat.tar),
        ("x.tar.zst", BaseFormat.tar),
        ("x.tgz", BaseFormat.tar),
        ("noble-server-cloudimg-amd64.squashfs", BaseFormat.squashfs),
        ("noble-server-cloudimg-amd64.img", BaseFormat.qcow2),
        ("Fedora-Cloud-Base-Generic-41-1.4.x86_64.qcow2", BaseFormat.qcow2),
        ("disk.raw.xz", BaseFormat.raw),
        ("README", None),
    ],
)
def test_format_is_guessed_from_the_name(name: str, fmt: BaseFormat | None) -> None:
    assert guess_format(name) is fmt


# ---------------------------------------------------------------------------------------------- per-distro data


def test_every_upstream_is_complete_data() -> None:
    assert set(UPSTREAMS) >= {"ubuntu", "debian", "fedora", "centos", "rocky", "almalinux"}
    for src in UPSTREAMS.values():
        assert src.directory.startswith("https://"), src.name
        if src.signing is Signing.detached:
            assert src.signature and src.key, src.name
        if src.signing is Signing.clearsigned:
            assert src.key and not src.signature, src.name
        if src.signing is Signing.unsigned:
            assert src.note, f"{src.name}: an unsigned upstream must say what to do instead"


def test_resolve_ubuntu_default_is_current_qcow2_with_detached_signature() -> None:
    r = resolve_base(BaseSpec(), distro="ubuntu", release="noble", arch="arm64")
    assert r.urls == ("https://cloud-images.ubuntu.com/noble/current/noble-server-cloudimg-arm64.img",)
    assert r.checksum_urls == ("https://cloud-images.ubuntu.com/noble/current/SHA256SUMS",)
    assert r.signature_urls == ("https://cloud-images.ubuntu.com/noble/current/SHA256SUMS.gpg",)
    assert r.format is BaseFormat.qcow2 and r.filename == "noble-server-cloudimg-arm64.img"
    assert r.fingerprints == ("D2EB44626FDDC30B513D5BB71A5D6C4C7DB87C81",)
    assert r.key is not None and r.key.file == "ubuntu-cloudimage-keyring.gpg"


def test_resolve_fedora_needs_a_version_and_maps_the_arch() -> None:
    with pytest.raises(SpecError, match=r"base\.version"):
        resolve_base(BaseSpec(), distro="fedora", release="41", arch="amd64")
    r = resolve_base(BaseSpec(version="1.4"), distro="fedora", release="41", arch="amd64")
    assert r.urls[0].endswith("/releases/41/Cloud/x86_64/images/Fedora-Cloud-Base-Generic-41-1.4.x86_64.qcow2")
    assert r.checksum_urls[0].endswith("/images/Fedora-Cloud-41-1.4-x86_64-CHECKSUM")
    assert r.signature_urls == ()  # clearsigned


def test_resolve_versioned_names_and_per_release_keys() -> None:
    debian = resolve_base(BaseSpec(version="20250210-2019"), distro="debian", release="bookworm", arch="amd64")
    assert debian.urls[0].endswith("/bookworm/20250210-2019/debian-12-genericcloud-amd64-20250210-2019.qcow2")
    assert debian.checksum_urls[0].endswith("/bookworm/20250210-2019/SHA512SUMS")
    with pytest.raises(SpecError, match="release 'sid'"):
        resolve_base(BaseSpec(), distro="debian", release="sid", arch="amd64")
    alma = resolve_base(BaseSpec(), distro="almalinux", release="9", arch="arm64")
    assert alma.urls[0].endswith("/9/cloud/aarch64/images/AlmaLinux-9-GenericCloud-latest.aarch64.qcow2")
    assert alma.signature_urls[0].endswith("/CHECKSUM.asc")
    assert alma.fingerprints == ("BF18AC2876178908D6E71267D36CB86CB86B3716",)
    assert alma.key is not None and alma.key.file == "RPM-GPG-KEY-AlmaLinux-9"
    rocky = resolve_base(BaseSpec(), distro="rocky", release="9", arch="amd64")
    assert rocky.checksum_urls[0].endswith("Rocky-9-GenericCloud-Base.latest.x86_64.qcow2.CHECKSUM")
    centos = resolve_base(BaseSpec(source="centos"), distro="debian", release="10", arch="amd64")
    assert centos.urls[0].endswith("/10-stream/x86_64/images/CentOS-Stream-GenericCloud-10-latest.x86_64.qcow2")


def test_resolve_spec_overrides_and_unknown_distros() -> None:
    spec = BaseSpec(url=["https://m1.invalid/r.tar.xz", "https://m2.invalid/r.tar.xz"],
                    checksum_url="https://m1.invalid/SHA256SUMS", signature_url="https://m1.invalid/SHA256SUMS.gpg")
    r = resolve_base(spec, distro="ubuntu", release="noble", arch="amd64")
    assert r.urls == ("https://m1.invalid/r.tar.xz", "https://m2.invalid/r.tar.xz")
    assert r.format is BaseFormat.tar and r.filename == "r.tar.xz"
    assert r.fingerprints == ("D2EB44626FDDC30B513D5BB71A5D6C4C7DB87C81",)  # the upstream's key still applies
    own_key = resolve_base(spec.model_copy(update={"keyring": Path("/etc/own.gpg")}), distro="ubuntu",
                           release="noble", arch="amd64")
    assert own_key.fingerprints == (), "a keyring from the spec is not held to the upstream's pins"
    with pytest.raises(SpecError, match="no upstream image data"):
        resolve_base(BaseSpec(), distro="gentoo", release="x", arch="amd64")
    with pytest.raises(SpecError, match="no riscv64 images"):
        resolve_base(BaseSpec(), distro="ubuntu", release="noble", arch="riscv64")


def _pinned(digest: str, url: str = "https://a.invalid/x.qcow2") -> PinnedBase:
    base = ResolvedBase(source=None, urls=(url,), filename="x.qcow2", format=BaseFormat.qcow2)
    return PinnedBase(base, Digest.parse(digest), trust="test")


def test_base_key_is_the_verified_digest_not_the_url() -> None:
    a = base_key_fields(_pinned(f"sha256:{SHA256}", "https://mirror-a.invalid/x.qcow2"))
    b = base_key_fields(_pinned(f"sha256:{SHA256}", "https://mirror-b.invalid/x.qcow2"))
    c = base_key_fields(_pinned(f"sha256:{'c' * 64}", "https://mirror-a.invalid/x.qcow2"))
    assert a == b, "the same bytes from another mirror are the same base"
    assert a != c, "a new image behind the same URL is another base"
    assert a["digest"] == f"sha256:{SHA256}"
    assert "url" not in a


# ---------------------------------------------------------------------------------------------- checksum files


def test_parse_gnu_and_bsd_checksum_lines() -> None:
    text = (
        "# a comment\n\n"
        f"{SHA256}  text-mode.img\n"
        f"{SHA256.upper()} *binary-mode.img\n"
        f"{SHA512}  ./dotted.tar.xz\n"
        f"SHA256 (bsd.qcow2) = {SHA256}\n"
        f"SHA512 (bsd.qcow2) = {SHA512}\n"
        f"# bsd.qcow2: 123 bytes\n"
        f"\\{SHA256}  new\\nline\n"
    )
    sums = parse_checksum_file(text, source="SUMS")
    assert sums.lookup("text-mode.img") == Digest("sha256", SHA256)
    assert sums.lookup("binary-mode.img") == Digest("sha256", SHA256)
    assert sums.lookup("dotted.tar.xz") == Digest("sha512", SHA512)
    assert sums.lookup("bsd.qcow2") == Digest("sha512", SHA512), "the strongest digest wins"
    assert sums.lookup("new\nline") == Digest("sha256", SHA256)
    assert sums.lookup("some/dir/text-mode.img") == Digest("sha256", SHA256)


def test_checksum_file_errors_name_the_problem() -> None:
    with pytest.raises(ChecksumFileError, match=r"does not list 'missing\.img'"):
        parse_checksum_file(f"{SHA256}  other.img\n", source="SUMS").lookup("missing.img")
    with pytest.raises(ChecksumFileError, match="line 2"):
        parse_checksum_file(f"{SHA256}  a.img\nthis is not a checksum\n", source="SUMS")
    with pytest.raises(ChecksumFileError, match="different sha256"):
        parse_checksum_file(f"{SHA256}  a.img\n{'c' * 64}  a.img\n", source="SUMS")
    with pytest.raises(ChecksumFileError, match="no checksums"):
        parse_checksum_file("# nothing\n", source="SUMS")
    with pytest.raises(ChecksumFileError, match="more than once"):
        parse_checksum_file(f"{SHA256}  a/x.img\n{'c' * 64}  b/x.img\n", source="SUMS").lookup("x.img")


def test_verification_errors_are_never_retryable() -> None:
    assert VerificationError.retryable is False
    assert issubclass(UnsignedChecksumError, VerificationError)


# ---------------------------------------------------------------------------------------------- signatures


def test_detached_signature_with_binary_and_armored_keyrings(published: uf.Published, tmp_path: Path) -> None:
    sums, sig = published.files["SHA256SUMS"], published.files["SHA256SUMS.gpg"]
    for ring in (published.key.keyring, published.key.armored):
        check = verify_signature(sums, signature=sig, keyrings=[ring], workdir=tmp_path, what="SHA256SUMS")
        assert check.primary == published.key.fingerprint
        assert check.signed == sums.read_bytes()
        assert check.kind == "detached"
    pinned = verify_signature(sums, signature=sig, keyrings=[published.key.keyring],
                              fingerprints=[published.key.fingerprint], workdir=tmp_path, what="SHA256SUMS")
    assert pinned.fingerprint == published.key.fingerprint


def test_clearsigned_file_yields_only_the_signed_text(published: uf.Published, tmp_path: Path) -> None:
    signed = published.files["CHECKSUM"]
    check = verify_signature(signed, signature=None, keyrings=[published.key.keyring], workdir=tmp_path,
                             what="CHECKSUM")
    assert check.kind == "clearsigned"
    assert b"BEGIN PGP" not in check.signed and b"SHA512 (disk.qcow2) = " in check.signed
    # text outside the signed block is not covered by the signature and must not be read
    padded = tmp_path / "padded"
    padded.write_bytes(signed.read_bytes() + f"SHA512 (evil.img) = {SHA512}\n".encode())
    check = verify_signature(padded, signature=None, keyrings=[published.key.keyring], workdir=tmp_path,
                             what="CHECKSUM")
    assert b"evil.img" not in check.signed


def test_tampered_checksum_file_is_a_bad_signature(published: uf.Published, tmp_path: Path) -> None:
    sums = tmp_path / "SHA256SUMS"
    sums.write_bytes(published.files["SHA256SUMS"].read_bytes().replace(b"disk.qcow2", b"disk.qcow3"))
    with pytest.raises(SignatureError, match="BAD signature"):
        verify_signature(sums, signature=published.files["SHA256SUMS.gpg"], keyrings=[published.key.keyring],
                         workdir=tmp_path, what="SHA256SUMS")
    clear = tmp_path / "CHECKSUM"
    clear.write_bytes(published.files["CHECKSUM"].read_bytes().replace(b"SHA512 (disk", b"SHA512 (dusk"))
    with pytest.raises(SignatureError, match="BAD signature"):
        verify_signature(clear, signature=None, keyrings=[published.key.keyring], workdir=tmp_path, what="CHECKSUM")


def test_signature_by_an_untrusted_key_is_refused(published: uf.Published, tmp_path: Path) -> None:
    sums = tmp_path / "SHA256SUMS"
    sums.write_bytes(published.files["SHA256SUMS"].read_bytes())
    evil = tmp_path / "SHA256SUMS.gpg"
    published.attacker.sign(sums, evil)
    published.attacker.stop()
    with pytest.raises(SignatureError, match="in none of the trusted keyrings"):
        verify_signature(sums, signature=evil, keyrings=[published.key.keyring], workdir=tmp_path, what="SUMS")
    # a keyring holding both keys, but pinned to the publisher's fingerprint
    with pytest.raises(SignatureError, match="not a pinned key"):
        verify_signature(sums, signature=evil, keyrings=[published.key.keyring, published.attacker.keyring],
                         fingerprints=[published.key.fingerprint], workdir=tmp_path, what="SUMS")


def test_a_signed_message_is_not_a_detached_signature(published: uf.Published, tmp_path: Path) -> None:
    """`gpgv SIG DATA` where SIG is any signed message passes in gpgv, and DATA is not checked at all."""
    evil = tmp_path / "SHA256SUMS"
    evil.write_text(f"{SHA256}  disk.qcow2\n")
    with pytest.raises(SignatureError, match="not a detached signature"):
        verify_signature(evil, signature=published.files["CHECKSUM"], keyrings=[published.key.keyring],
                         workdir=tmp_path, what="SHA256SUMS")


def test_unsigned_file_without_signature_is_refused(published: uf.Published, tmp_path: Path) -> None:
    with pytest.raises(UnsignedChecksumError, match="not clearsigned"):
        verify_signature(published.files["SHA256SUMS"], signature=None, keyrings=[published.key.keyring],
                         workdir=tmp_path, what="SHA256SUMS")


def test_dearmor_matches_the_binary_export(published: uf.Published) -> None:
    assert dearmor(published.key.armored.read_text()) == published.key.keyring.read_bytes()


# ---------------------------------------------------------------------------------------------- pin_base


def _spec(server: uf.FixtureServer, published: uf.Published, image: str = "disk.qcow2", **kw: object) -> ResolvedBase:
    fields: dict[str, object] = {"url": server.url(f"good/{image}"), "checksum_url": server.url("good/SHA256SUMS"),
                                 "signature_url": server.url("good/SHA256SUMS.gpg"), "keyring": published.key.keyring}
    fields.update(kw)
    fields = {k: v for k, v in fields.items() if v is not None}
    return resolve_base(BaseSpec.model_validate(fields), distro="debian", release="bookworm", arch="amd64")


def test_pin_base_detached_and_clearsigned(server: uf.FixtureServer, published: uf.Published, tmp_path: Path) -> None:
    digest = hashlib.sha256(published.files["disk.qcow2"].read_bytes()).hexdigest()
    pinned = pin_base(_spec(server, published), tmp_path / "a")
    assert pinned.digest == Digest("sha256", digest)
    assert pinned.signer == published.key.fingerprint and "detached" in pinned.trust
    clear = pin_base(_spec(server, published, checksum_url=server.url("good/CHECKSUM"), signature_url=None),
                     tmp_path / "b")
    assert clear.digest.algorithm == "sha512" and "clearsigned" in clear.trust
    assert pinned.manifest()["digest"] == f"sha256:{digest}"
    assert base_key_fields(pinned)["arch"] == "amd64"


def test_pin_base_unsigned_needs_the_explicit_opt_out(server: uf.FixtureServer, published: uf.Published,
                                                      tmp_path: Path) -> None:
    with pytest.raises(UnsignedChecksumError, match="insecure_skip_signature"):
        pin_base(_spec(server, published, signature_url=None), tmp_path)
    pinned = pin_base(_spec(server, published, signature_url=None, insecure_skip_signature=True), tmp_path)
    assert "NOT checked" in pinned.trust and pinned.signer is None
    # the opt-out also reads a clearsigned file's body without a key
    clear = pin_base(_spec(server, published, checksum_url=server.url("good/CHECKSUM"), signature_url=None,
                           keyring=None, insecure_skip_signature=True), tmp_path)
    assert clear.digest.algorithm == "sha512"


def test_pin_base_with_a_digest_in_the_spec_fetches_nothing(server: uf.FixtureServer, published: uf.Published,
                                                            tmp_path: Path) -> None:
    before = len(server.requests)
    spec = BaseSpec(url=server.url("good/disk.qcow2"), checksum=f"sha256:{SHA256}")
    pinned = pin_base(resolve_base(spec, distro="debian", release="bookworm", arch="amd64"), tmp_path)
    assert pinned.digest == Digest("sha256", SHA256) and len(server.requests) == before


def test_missing_key_message_names_the_key_and_where_to_put_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_KEYS", "/nonexistent")
    r = resolve_base(BaseSpec(), distro="ubuntu", release="noble", arch="amd64")
    with pytest.raises(SignatureError, match=r"D2EB44626FDDC30B513D5BB71A5D6C4C7DB87C81.*ubuntu-cloudimage-keyring"):
        find_keyrings(r)


def test_keys_are_found_in_kiln_keys_directories(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 published: uf.Published) -> None:
    (tmp_path / "RPM-GPG-KEY-AlmaLinux-9").write_bytes(published.key.armored.read_bytes())
    monkeypatch.setenv("KILN_KEYS", str(tmp_path))
    r = resolve_base(BaseSpec(), distro="almalinux", release="9", arch="amd64")
    assert find_keyrings(r) == [tmp_path / "RPM-GPG-KEY-AlmaLinux-9"]


def test_one_good_pinned_signature_among_several_suffices(published: uf.Published, tmp_path: Path) -> None:
    """Upstreams rotating keys sign with old and new: a signature by a key we lack is not an error."""
    sums = published.files["SHA256SUMS"]
    other = tmp_path / "other.sig"
    published.attacker.sign(sums, other)
    published.attacker.stop()
    both = tmp_path / "SHA256SUMS.gpg"
    both.write_bytes(other.read_bytes() + published.files["SHA256SUMS.gpg"].read_bytes())
    check = verify_signature(sums, signature=both, keyrings=[published.key.keyring],
                             fingerprints=[published.key.fingerprint], workdir=tmp_path, what="SHA256SUMS")
    assert check.primary == published.key.fingerprint
