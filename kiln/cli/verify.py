"""`kiln verify OUTPUT`: the command line of kiln/publish/verify.py. kiln/cli/main.py registers it with
`register(sub)`."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kiln.publish.signing import GNUPGHOME_ENV, PUBLIC_KEY, SIGNATURE, SIGNING_KEY_ENV
from kiln.publish.verify import verify_output


def register(sub: Any) -> None:
    """Add `verify` to kiln's subcommands (`sub` is argparse's subparsers object)."""
    v = sub.add_parser(
        "verify", help="check a build's output: SHA256SUMS's signature, every checksum, the SBOMs",
        description="Check that a build's output directory is what kiln signed: the signature of SHA256SUMS "
        "(by a key this host trusts), the sha256 of every file it lists, that every image, SBOM and manifest.json "
        "in the directory is listed, and that both SBOMs pass their libraries' validators and list exactly the "
        "manifest's packages. On the first thing wrong: one line naming the file, exit code 1.")
    v.add_argument("output", type=Path, metavar="OUTPUT_DIR", help="a build's output directory")
    v.add_argument("--keyring", type=Path, metavar="FILE",
                   help="trust the OpenPGP public key(s) in FILE (armored or binary) instead of this host's: the "
                   f"key {SIGNING_KEY_ENV} names (in {GNUPGHOME_ENV}), else this host's development key")
    v.add_argument("--key", metavar="FINGERPRINT",
                   help="the signature must be by this key (full fingerprint); without --keyring, the output's "
                   f"own {PUBLIC_KEY} is trusted as the key with this fingerprint")
    v.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    v.set_defaults(func=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    report = verify_output(args.output, keyring=args.keyring, key=args.key)
    if args.json:
        print(json.dumps({**asdict(report), "output": str(report.output), "verified": True}, indent=2))
        return 0
    print(f"kiln: {report.output}: verified")
    print(f"  signature: {SIGNATURE} good, by {report.signer} ({report.trusted})")
    print(f"  checksums: {len(report.files)} files match SHA256SUMS: {', '.join(report.files)}")
    for sbom in report.sboms:
        print(f"  sbom:      {sbom}: valid, lists the manifest's {report.packages} packages")
    if report.not_covered:
        print(f"  not signed (not images, SBOMs or the manifest): {', '.join(report.not_covered)}")
    return 0
