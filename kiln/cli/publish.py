"""`kiln publish`, `kiln rollback` and `kiln diff`: the command line of kiln/publish/.

kiln/cli/main.py registers them with `register(sub)`.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kiln.cli.common import add_cloud_options
from kiln.cloud import glance, s3
from kiln.host.progress import terminal_progress
from kiln.model.names import is_plain_name
from kiln.model.pkgdiff import package_diff
from kiln.model.publishing import PublishInputError, PublishSpec, S3Error, Visibility, parse_s3_url
from kiln.model.record import BuildRecord
from kiln.publish.catalog import glance_catalog, s3_catalog, table
from kiln.publish.core import publish
from kiln.publish.gates import GATES, choose_gates
from kiln.publish.manifest import write_record
from kiln.publish.promote import rollback
from kiln.publish.refresh import manifest_of, record_published

log = logging.getLogger("kiln.publish")


def _pair(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--property takes NAME=VALUE, not {value!r}")
    return key, val


def register(sub: Any) -> None:
    """Add `publish` and `rollback` to kiln's subcommands (`sub` is argparse's subparsers object)."""
    p = sub.add_parser("publish", help="publish a finished build to Glance and/or S3 (boot gate, promotion, retention)",
                       description="Upload the build as a candidate, run the boot gate, promote it to the stable "
                       "name (the old stable becomes previous), mirror it to S3, and rotate old images. Flags "
                       "override the spec's publish: section recorded in the build's manifest.")
    p.add_argument("output", type=Path, metavar="OUTPUT_DIR",
                   help="a build's output: images, manifest.json, SHA256SUMS")
    p.add_argument("--to", action="append", default=[], dest="targets", metavar="TARGET",
                   help="glance:CLOUD (a clouds.yaml entry) or s3://BUCKET/PREFIX (repeatable; replaces the spec's)")
    p.add_argument("--name", help="the stable image name (default: the spec's name)")
    p.add_argument("--visibility", choices=[v.value for v in Visibility], help="of the stable image in Glance")
    p.add_argument("--keep", type=int, help="images kept per name, stable included (default 3)")
    p.add_argument("--property", action="append", default=[], type=_pair, metavar="NAME=VALUE", dest="properties",
                   help="an extra Glance property (repeatable)")
    p.add_argument("--tag", action="append", default=[], dest="tags", help="a Glance tag of the stable image")
    p.add_argument("--disk-format", help="which of the build's formats goes to Glance (default: the first)")
    p.add_argument("--min-ram", type=int, metavar="MIB", help="default: the boot test's memory")
    p.add_argument("--gate", choices=sorted(GATES), default="manifest",
                   help="manifest: the build's own QEMU boot test must have passed (default); qemu: boot it "
                   "under local QEMU now; none: no gate")
    p.add_argument("--allow-withdrawn", action="store_true",
                   help="promote content that an earlier rollback withdrew")
    add_cloud_options(p, nova=True, cloud_help="publish to this cloud's Glance (the same as --to glance:NAME)")
    p.add_argument("--s3-endpoint", help="endpoint of an S3-compatible store (default: boto3's, AWS_ENDPOINT_URL_S3)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_publish)

    d = sub.add_parser("diff", help="the package diff between two builds (output dirs, manifests, S3 or Glance)",
                       description="Packages added, removed, upgraded (old -> new) and downgraded from OLD to NEW; "
                       "those that came from a security suite are marked. OLD and NEW: an output directory or "
                       "manifest.json; s3://BUCKET/PREFIX/NAME (its stable build) or .../NAME/BUILD_ID; "
                       "glance:CLOUD/NAME (the stable image, its manifest from this host's publish records).")
    d.add_argument("old", metavar="OLD")
    d.add_argument("new", metavar="NEW")
    d.add_argument("--clouds-yaml", type=Path, help="a clouds.yaml to read instead of the usual places")
    d.add_argument("--s3-endpoint", help="endpoint of an S3-compatible store (default: boto3's, AWS_ENDPOINT_URL_S3)")
    d.add_argument("--json", action="store_true", help="print the diff as JSON")
    d.set_defaults(func=cmd_diff)

    im = sub.add_parser("images", help="the catalog: every published version per image, with its state",
                        description="One row per version kiln published: its state (stable, previous, "
                        "candidate, retired, withdrawn), build id and date, package count and boot results "
                        "(from the build's manifest where this host or S3 keeps it), and whether a Nova server "
                        "uses it. Glance: --cloud NAME (or OS_CLOUD); S3: --s3 s3://BUCKET/PREFIX.")
    im.add_argument("name", nargs="?", metavar="NAME", help="one image name (default: every one)")
    add_cloud_options(im, nova=False)
    im.add_argument("--s3", metavar="s3://BUCKET/PREFIX", help="the catalog of an S3 location instead of Glance")
    im.add_argument("--s3-endpoint", help="endpoint of an S3-compatible store (default: boto3's, AWS_ENDPOINT_URL_S3)")
    im.add_argument("--json", action="store_true", help="print the catalog as JSON")
    im.set_defaults(func=cmd_images)

    r = sub.add_parser("rollback", help="restore the previous image of NAME in Glance",
                       description="The stable image is withdrawn (hidden, renamed NAME-withdrawn-BUILD) and the "
                       "previous one takes the stable name again.")
    r.add_argument("name", metavar="NAME")
    add_cloud_options(r, nova=False)
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_rollback)


def spec_from_args(base: PublishSpec, args: argparse.Namespace) -> PublishSpec:
    targets = [*args.targets, *([f"glance:{args.cloud}"] if getattr(args, "cloud", None) else [])]
    overrides: dict[str, Any] = {
        "targets": targets or None, "name": args.name, "visibility": args.visibility, "keep": args.keep,
        "disk_format": args.disk_format, "min_ram": args.min_ram, "s3_endpoint_url": args.s3_endpoint,
    }
    data = base.model_dump(mode="json")
    data.update({k: v for k, v in overrides.items() if v is not None})
    if args.properties:
        data["properties"] = {**data["properties"], **dict(args.properties)}
    if args.tags:
        data["tags"] = list(dict.fromkeys([*data["tags"], *args.tags]))
    try:
        return PublishSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors())
        raise PublishInputError(f"publish settings: {problems}") from None


def cmd_publish(args: argparse.Namespace) -> int:
    build = BuildRecord.load(args.output)
    spec = spec_from_args(build.publish_spec(), args)
    gates = choose_gates(spec, args.gate, has_compute=lambda cloud: glance.has_compute(
        glance.connect(cloud, clouds_yaml=args.clouds_yaml)), flavor=args.flavor, network=args.network)
    report = publish(build, spec, gate=GATES[args.gate], gates=gates, allow_withdrawn=args.allow_withdrawn,
                     clouds_yaml=args.clouds_yaml, progress=terminal_progress)
    record_published(build, spec.name or build.name)
    # the build's record says where it went: manifest.json, as the flow's publish stage writes it
    build.published.append({"status": "published", **asdict(report)})
    write_record(build)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
        return 0
    print(f"kiln: published {spec.name or build.name} (build {build.build_id})")
    if report.gate:
        print(f"  gate: {report.gate}")
    for g in report.glance:
        print(f"  glance {g.cloud}: image {g.image_id} ({g.action})"
              + (f", previous {g.previous_id}" if g.previous_id else ""))
        if g.deleted_ids:
            print(f"    retention deleted: {', '.join(g.deleted_ids)}")
        if g.kept_in_use_ids:
            print(f"    kept, still in use: {', '.join(g.kept_in_use_ids)}")
    for s in report.s3:
        print(f"  {s.url}: {len(s.uploaded)} uploaded, {len(s.skipped)} already there, under {s.prefix}")
        if s.deleted_builds:
            print(f"    retention deleted: {', '.join(s.deleted_builds)}")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:

    old = manifest_of(args.old, clouds_yaml=args.clouds_yaml, s3_endpoint=args.s3_endpoint)
    new = manifest_of(args.new, clouds_yaml=args.clouds_yaml, s3_endpoint=args.s3_endpoint)
    diff = package_diff(old, new)
    if args.json:
        print(json.dumps(diff.as_dict(), indent=2))
        return 0
    print(f"kiln: {old.get('spec', {}).get('name', '?')} {diff.old_build} -> {new.get('spec', {}).get('name', '?')} "
          f"{diff.new_build}: {diff.summary()}")
    for line in diff.lines():
        print(line)
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    if args.name is not None and not is_plain_name(args.name):
        raise PublishInputError(f"image name {args.name!r} may only contain letters, digits, '.', '_', '+', '-'")
    if args.s3:
        if args.cloud:
            raise PublishInputError("give --cloud (Glance) or --s3 (an S3 location), not both")
        try:
            location = parse_s3_url(args.s3)
        except S3Error as exc:
            raise PublishInputError(str(exc)) from None
        entries = s3_catalog(s3.client(endpoint_url=args.s3_endpoint), location, args.name)
    else:
        entries = glance_catalog(glance.connect(args.cloud, clouds_yaml=args.clouds_yaml), args.name)
    if args.json:
        print(json.dumps([e.as_dict() for e in entries], indent=2))
    elif entries:
        print(table(entries))
    else:
        print(f"kiln: no published images{f' named {args.name}' if args.name else ''} there")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    conn = glance.connect(args.cloud, clouds_yaml=args.clouds_yaml)
    report = rollback(conn, args.name)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
        return 0
    print(f"kiln: {args.name} on {report.cloud} is image {report.restored_id} again; "
          f"withdrew {report.withdrawn_id}" + (f"; previous is now {report.previous_id}" if report.previous_id else ""))
    return 0
