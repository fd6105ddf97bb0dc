"""Signing a build's SHA256SUMS (a detached OpenPGP signature, `gpg`) and the keys `kiln verify` trusts.

The operator names the key: `KILN_SIGNING_KEY` (a fingerprint or key id of a secret key) in the GnuPG home
`KILN_GNUPGHOME` (else `GNUPGHOME`, else gpg's default); `KILN_SIGNING_PASSPHRASE_FILE` for a key with a
passphrase and no agent that has it. With none named, kiln signs with a development key of this host,
generated once into its state directory (`STATE/signing`, 0700; never into a repository or an output) and
says so in the build's log: fine for trying kiln, not for an operator's catalog.

Beside SHA256SUMS go `SHA256SUMS.gpg` (the signature) and `SHA256SUMS.key` (the signer's public key, for
reference). `kiln verify` trusts the operator's named key or this host's development key, or a keyring it is
given, never the key an output ships unless a fingerprint pins it: whoever changed the files could have
replaced that key too.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kiln.host.checksums import write_replacing
from kiln.host.run import output, run
from kiln.host.state import private_dir, state_dir
from kiln.model.errors import CommandError, KilnError
from kiln.sources.verify import SignatureError, verify_signature

log = logging.getLogger("kiln.publish")

SIGNING_KEY_ENV = "KILN_SIGNING_KEY"
GNUPGHOME_ENV = "KILN_GNUPGHOME"
PASSPHRASE_FILE_ENV = "KILN_SIGNING_PASSPHRASE_FILE"
SIGNATURE = "SHA256SUMS.gpg"
PUBLIC_KEY = "SHA256SUMS.key"
DEV_HOME = "signing"  # under kiln's state directory
DEV_UID = "kiln development key"
GPG_TIMEOUT = 120
AGENT_STOP_SECONDS = 5.0


class SigningError(KilnError):
    """The signing key named cannot be used (missing, not a secret key, ambiguous); bad configuration."""

    exit_code = 2


@dataclass(frozen=True)
class Signer:
    """A secret key kiln signs with, in its GnuPG home."""

    home: Path
    fingerprint: str  # the primary key's
    development: bool
    passphrase_file: Path | None = None

    @property
    def what(self) -> str:
        return (f"this host's development key {self.fingerprint} ({self.home})" if self.development else
                f"the key {self.fingerprint} that {SIGNING_KEY_ENV} names")


def _env(home: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "GNUPGHOME": str(home)}


def _gpg(home: Path, *args: str, what: str) -> str:
    return output(["gpg", "--homedir", str(home), "--batch", "--no-tty", *args], env=_env(home),
                  timeout=GPG_TIMEOUT, what=what)


def operator_home() -> Path:
    """The GnuPG home the operator's key is in: KILN_GNUPGHOME, else GNUPGHOME, else ~/.gnupg."""
    named = os.environ.get(GNUPGHOME_ENV) or os.environ.get("GNUPGHOME")
    return Path(named).expanduser() if named else Path.home() / ".gnupg"


def development_home() -> Path:
    return state_dir() / DEV_HOME


def _secret_keys(home: Path, key: str | None, *, what: str) -> list[tuple[str, bool]]:
    """(primary fingerprint, can sign) of the secret keys in `home` that `key` names (all without one)."""
    try:
        text = _gpg(home, "--with-colons", "--list-secret-keys", *([key] if key else []), what=what)
    except CommandError:
        if key is None:  # listing a whole home fails only when gpg does: never read as "no key, make one"
            raise
        return []  # gpg exits 2 for a key it does not have
    keys: list[tuple[str, bool]] = []
    expect_fpr = False
    capabilities = ""
    for line in text.splitlines():
        fields = line.split(":")
        if fields[0] == "sec":
            expect_fpr, capabilities = True, fields[11] if len(fields) > 11 else ""
        elif fields[0] == "fpr" and expect_fpr:
            keys.append((fields[9].upper(), "S" in capabilities))
            expect_fpr = False
        elif fields[0] == "ssb":
            expect_fpr = False
    return keys


def operator_signer() -> Signer | None:
    """The key KILN_SIGNING_KEY names, or None when it names none."""
    key = os.environ.get(SIGNING_KEY_ENV, "").strip()
    if not key:
        return None
    home = operator_home()
    if not home.is_dir():
        raise SigningError(f"{SIGNING_KEY_ENV}={key}: no GnuPG home {home} (set {GNUPGHOME_ENV} to the "
                           "directory that holds the secret key)")
    found = _secret_keys(home, key, what=f"find the signing key {key}")
    if not found:
        raise SigningError(f"{SIGNING_KEY_ENV}={key}: no such secret key in {home} (gpg --homedir {home} "
                           "--list-secret-keys lists what is there)")
    if len(found) > 1:
        raise SigningError(f"{SIGNING_KEY_ENV}={key} names {len(found)} secret keys in {home}: give the full "
                           "fingerprint")
    fingerprint, can_sign = found[0]
    if not can_sign:
        raise SigningError(f"{SIGNING_KEY_ENV}={key}: the key {fingerprint} has no usable signing (sub)key "
                           "(expired, revoked or encryption-only)")
    passphrase = os.environ.get(PASSPHRASE_FILE_ENV)
    return Signer(home=home, fingerprint=fingerprint, development=False,
                  passphrase_file=Path(passphrase) if passphrase else None)


@contextlib.contextmanager
def _development_lock(home: Path) -> Iterator[None]:
    """One kiln process at a time uses the development home (matrix cells sign in parallel): the key is made
    once, and the gpg-agent one process started is stopped before the next starts its own."""
    with open(home / ".kiln-lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            _stop_agent(home)
            fcntl.flock(fh, fcntl.LOCK_UN)


def _stop_agent(home: Path) -> None:
    """gpg starts an agent for a home's secret keys that outlives it: kiln stops the one of its own home, and
    waits until it is gone (it removes its socket last): a gpg started meanwhile would talk to the dying agent
    and fail with "End of file"."""
    socket_path = home / "S.gpg-agent"
    if not socket_path.exists():
        return
    with contextlib.suppress(CommandError):
        run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], env=_env(home), quiet=True,
            timeout=30, what="stop the development home's gpg-agent")
    deadline = time.monotonic() + AGENT_STOP_SECONDS
    while socket_path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def development_signer(*, create: bool = True) -> Signer | None:
    """This host's development key: made on first use (ed25519, no passphrase, no expiry) in STATE/signing."""
    home = development_home()
    if not home.is_dir() and not create:
        return None
    private_dir(home)
    with _development_lock(home):
        found = [k for k in _secret_keys(home, None, what="find the development key") if k[1]]
        if not found and create:
            uid = f"{DEV_UID} ({socket.gethostname()[:60]}) <kiln-dev@localhost>"
            _gpg(home, "--pinentry-mode", "loopback", "--passphrase", "", "--quick-generate-key", uid,
                 "ed25519", "sign", "never", what="make the development signing key")
            found = [k for k in _secret_keys(home, None, what="find the development key") if k[1]]
            if found:
                log.warning("made a development signing key %s in %s: builds of this host are signed with it "
                            "until %s names a key of yours", found[0][0], home, SIGNING_KEY_ENV)
    if not found:
        if not create:
            return None
        raise SigningError(f"{home}: no signing key after making one (gpg said nothing)")
    return Signer(home=home, fingerprint=sorted(found)[0][0], development=True)


def signer() -> Signer:
    """The key builds are signed with: the operator's (KILN_SIGNING_KEY), else this host's development key."""
    return operator_signer() or development_signer()  # type: ignore[return-value]


def sign_detached(signer: Signer, data: Path, signature: Path, public_key: Path) -> None:
    """`signature`: a detached binary OpenPGP signature of `data`; `public_key`: the signer's public key,
    armored. Both written whole and renamed into place."""
    with contextlib.ExitStack() as stack:
        if signer.development:
            stack.enter_context(_development_lock(signer.home))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kiln-sign.")))
        args = ["--local-user", signer.fingerprint, "--digest-algo", "SHA256"]
        if signer.passphrase_file is not None:
            args += ["--pinentry-mode", "loopback", "--passphrase-file", str(signer.passphrase_file)]
        _gpg(signer.home, *args, "--output", str(tmp / "sig"), "--detach-sign", str(data),
             what=f"sign {data.name} with {signer.what}")
        key = _gpg(signer.home, "--armor", "--export-options", "export-minimal", "--export", signer.fingerprint,
                   what=f"export the public key {signer.fingerprint}")
        partial = signature.with_name(f".{signature.name}.partial")
        partial.unlink(missing_ok=True)
        partial.write_bytes((tmp / "sig").read_bytes())
        os.chmod(partial, 0o644)
        os.replace(partial, signature)
    write_replacing(public_key, key + "\n")


def signed_by(signer: Signer, data: Path, signature: Path) -> bool:
    """Whether `signature` is a good detached signature of `data` by `signer`'s key (both read without
    following a link, checked with gpgv against that key alone)."""
    with tempfile.TemporaryDirectory(prefix="kiln-sigcheck.") as tmp:
        work = Path(tmp)
        for src, name in ((data, "data"), (signature, "data.gpg")):
            try:
                with open(src, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW | os.O_NONBLOCK)) as fh:
                    if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                        return False
                    (work / name).write_bytes(fh.read(64 << 20))
            except OSError:
                return False
        key = export_public_key(signer.home, signer.fingerprint, work / "key.asc")
        try:
            verify_signature(work / "data", signature=work / "data.gpg", keyrings=[key],
                             fingerprints=[signer.fingerprint], workdir=work / "gpgv", what=str(signature))
        except SignatureError:
            return False
    return True


def export_public_key(home: Path, fingerprint: str, dest: Path) -> Path:
    """The public key `fingerprint` of `home`, armored, as the file `dest` (what gpgv is given to trust)."""
    text = _gpg(home, "--armor", "--export", fingerprint, what=f"export the public key {fingerprint}")
    if "BEGIN PGP PUBLIC KEY BLOCK" not in text:
        raise SigningError(f"{home}: no public key {fingerprint} to trust")
    dest.write_text(text + "\n")
    return dest


@dataclass(frozen=True)
class TrustedKey:
    """A key file `kiln verify` checks signatures against, and what it is."""

    path: Path
    what: str


def default_trusted_keys(workdir: Path) -> list[TrustedKey]:
    """The keys `kiln verify` trusts unless told otherwise: the operator's named key, else this host's
    development key (none when neither exists)."""
    operator = operator_signer()
    if operator is not None:
        return [TrustedKey(export_public_key(operator.home, operator.fingerprint, workdir / "operator.asc"),
                           f"the key {SIGNING_KEY_ENV} names")]
    dev = development_signer(create=False)
    if dev is None:
        return []
    return [TrustedKey(export_public_key(dev.home, dev.fingerprint, workdir / "development.asc"),
                       "this host's development key")]

