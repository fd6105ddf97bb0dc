"""The `kiln` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kiln import __version__
from kiln.boot import nova
from kiln.boot.conformance import summary
from kiln.boot.local import boot_firmware, run_boot_test_of_output
from kiln.build.customize import check_break
from kiln.build.plan import hand_over, make_plan
from kiln.cli import dib as dib_cli
from kiln.cli import reproducible
from kiln.cli.common import (
    KilnArgumentParser,
    add_cache,
    add_cloud_options,
    add_verbose_everywhere,
    dib_variables,
    size_arg,
)
from kiln.cli.matrix import register as register_matrix
from kiln.cli.publish import register as register_publish
from kiln.cli.verify import register as register_verify
from kiln.host.checksums import write_replacing
from kiln.host.run import redact, terminate_all
from kiln.host.state import state_dir
from kiln.image.convert import convert_key
from kiln.image.pack import pack_key_of
from kiln.model.errors import KilnError, SpecError
from kiln.model.options import BuildOptions
from kiln.model.record import MANIFEST, BuildRecord, new_build_id
from kiln.model.spec import ImageSpec, load_spec, merge_overrides, read_spec_file, spec_from_dict
from kiln.server import prefect as prefect_server
from kiln.store.entries import Store
from kiln.store.gc import reclaim_dead_builds

log = logging.getLogger("kiln.cli")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _env_pair(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--env takes NAME=VALUE, not {value!r}")
    return key, val


def add_spec_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", type=Path, help="image spec file (YAML); flags add to it or override it")
    p.add_argument("--name")
    p.add_argument("--distro")
    p.add_argument("--release")
    p.add_argument("--arch")
    p.add_argument("-e", "--element", action="append", default=[], dest="elements", metavar="NAME",
                   help="add an element (repeatable)")
    p.add_argument("-p", "--package", action="append", default=[], dest="packages", metavar="NAME",
                   help="add a package (repeatable)")
    p.add_argument("--env", action="append", default=[], type=_env_pair, metavar="NAME=VALUE",
                   help="a variable for the element hooks (repeatable)")
    p.add_argument("--secret", action="append", default=[], metavar="NAME",
                   help="pass the environment variable NAME to the hooks as a secret (never logged or stored)")
    p.add_argument("--size", help="disk size, e.g. 4G")
    p.add_argument("--format", type=_csv, help="output formats, e.g. qcow2,raw")
    p.add_argument("--compression", choices=["zstd", "zlib", "none"],
                   help="qcow2 compression (default: the spec's, zstd)")
    p.add_argument("--mirror", help="package mirror (default: DIB_DISTRIBUTION_MIRROR or the host's apt sources)")
    p.add_argument("--firmware", type=_csv, help="boot test firmware: bios,uefi")
    p.add_argument("--boot-backend", choices=["qemu", "nova"],
                   help="boot test under local QEMU (default) or in a cloud's Nova (see --boot-cloud)")
    p.add_argument("--boot-cloud", "--cloud", metavar="NAME", dest="boot_cloud",
                   help="nova boot test: the clouds.yaml cloud (default: the spec's glance publish target, else "
                   "OS_CLOUD)")
    p.add_argument("--clouds-yaml", type=Path, metavar="PATH",
                   help="a clouds.yaml to read (default: OS_CLIENT_CONFIG_FILE, else the usual places)")
    p.add_argument("--flavor", help="nova boot test: flavor name or id (default: the smallest that fits)")
    p.add_argument("--network", help="nova boot test: none (default), auto, or a network name or id")
    p.add_argument("--boot-root-login", action="store_true", default=None,
                   help="boot test: set a root password through user-data and log in with it (cloud-init-cfg)")
    p.add_argument("--dib-elements", action="store_true",
                   help="search the installed diskimage-builder package's elements (before kiln's own)")
    p.add_argument("--elements-path", action="append", default=[], metavar="DIR",
                   help="element directory searched before kiln's own (repeatable; also ELEMENTS_PATH)")


def _secrets_from_env(names: list[str]) -> dict[str, str]:
    missing = [n for n in names if n not in os.environ]
    if missing:
        raise SpecError(f"--secret {missing[0]}: the environment variable {missing[0]} is not set")
    return {n: os.environ[n] for n in names}


def spec_from_args(args: argparse.Namespace) -> ImageSpec:
    overrides: dict[str, Any] = {
        "name": args.name, "distro": args.distro, "release": args.release, "arch": args.arch,
        "size": args.size, "formats": args.format, "compression": args.compression, "mirror": args.mirror,
        "add_elements": args.elements or None, "add_packages": args.packages or None,
        "env": dict(args.env) if args.env else None,
        "secrets": _secrets_from_env(args.secret) or None,
        "boot_test": {k: v for k, v in (("firmware", args.firmware), ("root_login", args.boot_root_login),
                                        ("backend", args.boot_backend), ("cloud", args.boot_cloud),
                                        ("flavor", args.flavor), ("network", args.network)) if v} or None,
    }
    written = read_spec_file(args.spec) if args.spec is not None else {}
    where = f"{args.spec} and the command line" if args.spec is not None else "the command line"
    dib = dib_variables(os.environ, release=args.release or written.get("release"),
                        size=args.size or (str(written["size"]) if written.get("size") else None), where=where)
    overrides.update({k: v for k, v in dib.items() if overrides.get(k) is None})
    if args.spec is not None:
        return load_spec(args.spec, overrides)
    return spec_from_dict(merge_overrides({}, overrides), "command line")


def _start_prefect() -> None:

    state = state_dir()
    url = prefect_server.ensure_server(state)
    prefect_server.configure_environment(url, state)


def run_build(spec: ImageSpec, options: BuildOptions, *, as_json: bool = False) -> int:
    """Build `spec` on the embedded (or the user's) Prefect server and print where the results are (with
    `as_json`, the build record as manifest.json has it, alone on stdout)."""

    check_break(options.break_at)
    # planned here, before Prefect starts, so that bad input fails at once; the flow takes this plan
    plan = make_plan(spec, elements_path=options.elements_path, dib_elements=options.dib_elements)
    options = options.model_copy(update={"plan_ref": hand_over(plan)})
    _reclaim(options.cache)
    _start_prefect()
    from flows.build import build_image

    _quiet_kiln_tracebacks()
    start = time.monotonic()
    record = build_image(spec, options, new_build_id())
    if as_json:
        print(json.dumps(record.manifest(), indent=2))
        return 0
    print(f"\nkiln: built {spec.name} in {time.monotonic() - start:.0f} s")
    if record.run_url:
        print(f"  run:      {record.run_url}")
    for image in record.images:
        print(f"  image:    {record.image_path(image)}")
    print(f"  manifest: {record.path_of(MANIFEST)}")
    for b in record.boot_test:
        print(f"  boot test {b.firmware}: {'passed' if b.passed else 'FAILED'} "
              f"({b.seconds:.0f} s, {b.accel}{', cached' if b.cached else ''}"
              f"{'; conformance ' + summary(b.checks) if b.checks else ''})")
    published = record.published[-1] if record.published else {}
    if published.get("gate"):
        print(f"  boot gate: {published['gate']}")
    for g in published.get("glance", []):
        print(f"  glance:   {g['cloud']}: {g['name']} = {g['image_id']} ({g['action']})")
    for s3 in published.get("s3", []):
        print(f"  s3:       {s3['url']}")
    return 0


class _NoKilnTracebacks(logging.Filter):
    """kiln's own errors are written for the operator: show their message, not a traceback (the run's logs
    on the Prefect server keep the full record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KilnError):
            record.exc_info = None
            record.exc_text = None
        return True


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines to whatever `sys.stderr` is when they are written: while a live progress line is on the
    terminal (kiln.host.progress), rich has redirected it, and the lines scroll above the progress."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _current_stage() -> str | None:
    """The task run (= stage) the calling thread works for, if Prefect is running one."""
    context = sys.modules.get("prefect.context")  # not imported by kiln's CLI unless a flow runs
    run = context.TaskRunContext.get() if context is not None else None
    return str(run.task_run.name) if run is not None else None


class _StageNames(logging.Filter):
    """Every line of a stage names it: Prefect's run lines carry the task run's name (the stage:
    `customize install.d`, `boot_test uefi`), kiln's own lines are given the task run they are logged in.
    A task's end is left out: the flow says in one line per stage whether it ran or came from the cache,
    and how long it took."""

    def __init__(self, *, prefect_lines: bool) -> None:
        super().__init__()
        self.prefect_lines = prefect_lines  # False on Prefect's own console handler, whose format names runs

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "prefect.task_runs" and str(record.msg).startswith("Finished in state "):
            return False
        name = None
        if self.prefect_lines:
            name = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        if name is None and record.name.startswith("kiln."):
            name = _current_stage()
        if name and not getattr(record, "_kiln_named", False):
            record.msg = f"{str(name).replace('%', '%%') if record.args else name}: {record.msg}"
            record._kiln_named = True
        return True


def _quiet_kiln_tracebacks() -> None:
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _NoKilnTracebacks) for f in handler.filters):
                handler.addFilter(_NoKilnTracebacks())
            if not any(isinstance(f, _StageNames) for f in handler.filters):
                handler.addFilter(_StageNames(prefect_lines=isinstance(handler, _StderrHandler)))


def cmd_build(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    if args.clouds_yaml:  # what openstacksdk reads, in the flow's publish and Nova boot stages
        if not args.clouds_yaml.is_file():
            raise SpecError(f"--clouds-yaml {args.clouds_yaml}: no such file")
        os.environ["OS_CLIENT_CONFIG_FILE"] = str(args.clouds_yaml.resolve())
    options = BuildOptions(output=args.output, elements_path=args.elements_path, cache=args.cache,
                           no_cache=args.no_cache, boot_test=not args.no_boot_test, dib_elements=args.dib_elements,
                           break_at=args.break_at, publish=not args.no_publish)
    if args.check_reproducible:
        return reproducible.check_reproducible(spec, options, run_build)
    return run_build(spec, options, as_json=args.json)


def cmd_dib(argv: list[str]) -> int:
    """`kiln dib …`: a disk-image-create command line."""

    spec, opts = dib_cli.parse(argv)
    if opts["logfile"]:
        handler = logging.FileHandler(opts["logfile"])
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        logging.getLogger("prefect").addHandler(handler)
    options = BuildOptions(output=opts["output"], cache=opts["cache"], boot_test=opts["boot_test"],
                           dib_elements=opts["dib_elements"], checksum_files=opts["checksum"],
                           break_at=opts["break_at"])
    return run_build(spec, options)


def cmd_boot_test(args: argparse.Namespace) -> int:
    """Boot-test a finished build (its output directory) on its own: local QEMU, or a cloud's Nova."""
    if args.backend == "nova":
        return _boot_test_nova(args)
    for flag in ("cloud", "clouds_yaml", "flavor", "network"):
        if getattr(args, flag):
            raise SpecError(f"--{flag.replace('_', '-')} is for --backend nova")

    results = run_boot_test_of_output(BuildRecord.load(Path(args.output_dir)), backend=args.backend,
                                      firmware=args.firmware or None, timeout=args.timeout)
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
        return 0
    for r in results:
        print(f"boot test {r.firmware}: {'passed' if r.passed else 'FAILED'} in {r.seconds:.0f} s ({r.accel}"
              f"{'; conformance ' + summary(r.checks) if r.checks else ''}); console log: {r.serial_log}")
    return 0


def _boot_test_nova(args: argparse.Namespace) -> int:

    if args.firmware:
        raise SpecError("--firmware is for --backend qemu: in Nova the image's hw_firmware_type decides")
    output = Path(args.output_dir)
    result = nova.boot_test_output(BuildRecord.load(output), cloud=args.cloud, clouds_yaml=args.clouds_yaml,
                                   flavor=args.flavor, network=args.network, timeout=args.timeout)
    log_path = output / "boot-nova-console.log"
    write_replacing(log_path, result.console)
    print(f"boot test nova ({result.cloud}, flavor {result.flavor}, network {result.network}): passed in "
          f"{result.seconds:.0f} s (ACTIVE after {result.active_seconds:.0f} s"
          f"{f'; ssh root@{result.address} with the injected password: ok' if result.ssh_ok else ''}"
          f"{'; conformance ' + summary(result.checks) if result.checks else ''}); server {result.server_id} "
          f"deleted; console log: {log_path}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:

    spec = spec_from_args(args)
    plan = make_plan(spec, elements_path=args.elements_path, dib_elements=args.dib_elements)
    base = (f"upstream {plan.upstream.base.what}" if plan.upstream else
            f"bootstrap {spec.distro.value} {spec.release} {spec.arch.value}")
    packed = pack_key_of(plan)
    converts = [(fmt.value, convert_key(packed, fmt.value, spec.compression, spec.qemu_img_options))
                for fmt in spec.formats]
    boots = boot_firmware(spec) if spec.boot_test.enabled else []
    if args.json:
        print(json.dumps({"spec": spec.model_dump(mode="json"), "mirror": plan.mirror,
                          "elements": [e.__dict__ for e in plan.elements],
                          "base": {"key": plan.base_key, "what": base},
                          "steps": [{"phase": s.phase, "name": s.name, "element": s.element, "kind": s.kind,
                                     "key": s.key, "packages": list(s.packages)} for s in plan.steps],
                          "pack": {"key": packed, "size": spec.size},
                          "convert": [{"format": f, "key": k} for f, k in converts],
                          "boot_test": {"backend": spec.boot_test.backend.value, "firmware": boots}}, indent=2))
        return 0
    print(f"{spec.name}: {spec.distro.value} {spec.release} {spec.arch.value} from {plan.mirror}")
    print("elements: " + ", ".join(e.name for e in plan.elements))
    print(f"  {plan.base_key[:12]}  {'base':<15} {base}")
    for s in plan.steps:
        extra = f" [{' '.join(s.packages)}]" if s.packages else ""
        print(f"  {s.key[:12]}  {s.phase:<15} {s.name:<30} {s.element}{extra}")
    print(f"  {packed[:12]}  {'pack':<15} a {spec.size / 1024**3:g} GiB raw disk")
    for fmt, key in converts:
        print(f"  {key[:12]}  {'convert':<15} {fmt}{f' ({spec.compression})' if fmt == 'qcow2' else ''}")
    if boots:
        print(f"  {'(its sha256)':<12}  {'boot_test':<15} {spec.boot_test.backend.value}: {', '.join(boots)} "
              "(keyed by the image, once it exists)")
    return 0


def _store(cache: str | None, *, existing: bool = False) -> Any:
    """The store at `cache` (default KILN_CACHE, else ~/.cache/kiln); `existing`: an error when a --cache
    given names no directory (kiln cache and kiln gc look at a store, they do not make one)."""
    if existing and cache and not Path(cache).is_dir():
        raise SpecError(f"--cache {cache}: no such directory (no store there)")
    env_cache = os.environ.get("KILN_CACHE", "")
    if existing and not cache and env_cache and not Path(env_cache).is_dir():
        raise SpecError(f"KILN_CACHE={env_cache}: no such directory (no store there)")
    return Store(Path(cache) if cache else None)


def _reclaim(cache: str | None) -> None:

    for line in reclaim_dead_builds(_store(cache)):
        log.warning("%s", line)


def cmd_cache(args: argparse.Namespace) -> int:
    store = _store(args.cache, existing=True)
    if args.cache_cmd == "ls":
        entries = sorted(store.entries(), key=lambda e: e.last_use, reverse=True)
        if args.json:
            print(json.dumps({"store": str(store.root), "entries": [
                {"key": e.key, "kind": e.kind, "size": e.size, "last_use": e.last_use,
                 "description": e.description} for e in entries]}, indent=2))
            return 0
        total = 0
        print(f"{'key':<14} {'kind':<6} {'size':>9}  {'last use':<19}  description")
        for e in entries:
            total += e.size
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_use))
            print(f"{e.key[:12]:<14} {e.kind:<6} {e.size / 1024**2:>7.1f}M  {when}  {e.description}")
        print(f"{len(entries)} entries, {total / 1024**2:.1f} MiB in {store.root}")
    elif args.cache_cmd == "gc":
        removed = store.gc(args.max_size)
        freed = sum(e.size for e in removed)
        if args.json:
            print(json.dumps({"removed": [{"key": e.key, "kind": e.kind, "size": e.size,
                                           "description": e.description} for e in removed], "freed": freed}))
            return 0
        print(f"removed {len(removed)} entries, {freed / 1024**2:.1f} MiB freed")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:

    lines = reclaim_dead_builds(_store(args.cache, existing=True))
    if args.json:
        print(json.dumps({"reclaimed": lines}, indent=2))
        return 0
    for line in lines:
        print(line)
    if not lines:
        print("nothing to reclaim")
    return 0


def cmd_server(args: argparse.Namespace) -> int:

    if args.server_cmd == "start":
        print(prefect_server.ensure_server(state_dir()))
    elif args.server_cmd == "stop":
        print("stopped" if prefect_server.stop_server(state_dir()) else "not running")
    else:
        status = prefect_server.server_status(state_dir())
        print(json.dumps(status, indent=2) if status else "not running")
    return 0


def parser() -> argparse.ArgumentParser:
    p = KilnArgumentParser(prog="kiln", description="Build OpenStack cloud images as Prefect flows.",
                           epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"kiln {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug output")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=KilnArgumentParser)

    b = sub.add_parser("build", help="build (and boot-test) an image")
    add_spec_flags(b)
    b.add_argument("-o", "--output", default="output", help="output directory (default: ./output)")
    add_cache(b)
    b.add_argument("--no-cache", action="store_true", help="rebuild every step")
    b.add_argument("--no-boot-test", action="store_true", help="skip the QEMU boot test")
    b.add_argument("--no-publish", action="store_true", help="do not publish to the spec's publish targets")
    b.add_argument("--break", dest="break_at", metavar="POINT",
                   help="drop into a shell: before-<phase>, after-<phase> or after-error (DIB's break=)")
    b.add_argument("--json", action="store_true", help="print the build record (manifest.json) on stdout")
    b.add_argument("-q", "--quiet", action="store_true", help="only the stage lines, warnings and errors")
    reproducible.register(b)
    b.set_defaults(func=cmd_build)

    pl = sub.add_parser("plan", help="show the resolved elements and every step with its cache key")
    add_spec_flags(pl)
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)

    bt = sub.add_parser("boot-test", help="boot-test a finished build (an output directory with manifest.json)")
    bt.add_argument("output_dir", metavar="OUTPUT_DIR")
    bt.add_argument("--backend", choices=["qemu", "nova"], default="qemu",
                    help="where to boot it: local QEMU (default) or a cloud's Nova")
    bt.add_argument("--firmware", type=_csv, help="qemu: bios,uefi (default: the spec's)")
    bt.add_argument("--timeout", type=int, help="seconds until cloud-init must have finished")
    add_cloud_options(bt, nova=True, cloud_help="nova: a clouds.yaml entry (default: OS_CLOUD)")
    bt.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    bt.set_defaults(func=cmd_boot_test)

    c = sub.add_parser("cache", help="inspect or trim the layer and artifact store")
    add_cache(c)
    csub = c.add_subparsers(dest="cache_cmd", required=True, parser_class=KilnArgumentParser)
    ls = csub.add_parser("ls", help="entries with size and last use")
    ls.add_argument("--json", action="store_true", help="print the entries as JSON on stdout")
    gc = csub.add_parser("gc", help="remove least recently used entries")
    gc.add_argument("--max-size", required=True, type=size_arg, help="keep at most this much, e.g. 20G")
    gc.add_argument("--json", action="store_true", help="print the removed entries as JSON on stdout")
    c.set_defaults(func=cmd_cache)

    g = sub.add_parser("gc", help="reclaim mounts and temporary entries left by killed builds")
    add_cache(g)
    g.add_argument("--json", action="store_true", help="print what was reclaimed as JSON on stdout")
    g.set_defaults(func=cmd_gc)

    sub.add_parser("dib", help="build from a diskimage-builder command line (kiln dib -h)", add_help=False)


    register_matrix(sub)
    register_publish(sub)
    register_verify(sub)

    s = sub.add_parser("server", help="the local Prefect server kiln starts on demand")
    s.add_argument("server_cmd", choices=["start", "stop", "status"])
    s.set_defaults(func=cmd_server)
    add_verbose_everywhere(p)
    return p


STOP_GRACE_ENV = "KILN_STOP_GRACE"  # seconds a signalled kiln gets to tear down before it exits anyway
_stopping = threading.Event()


def _exit_after_grace(grace: float) -> None:
    time.sleep(grace)
    print(f"kiln: still running {grace:.0f} s after the signal (a Prefect server that stopped answering?); "
          "exiting now: the next kiln command or `kiln gc` reclaims what is left", file=sys.stderr, flush=True)
    os._exit(130)


def _on_signal(signum: int, _frame: object) -> None:
    """Children are killed at once, then the main thread unwinds (hooks, mounts, QEMU torn down). Prefect
    reports the crash to its server on the way out; if that server is gone, its retries would keep kiln
    alive for minutes, so a watchdog ends the process after a grace period."""

    terminate_all()
    if not _stopping.is_set():
        _stopping.set()
        grace = float(os.environ.get(STOP_GRACE_ENV) or 120)
        threading.Thread(target=_exit_after_grace, args=(grace,), daemon=True, name="kiln-stop-grace").start()
    raise KeyboardInterrupt(f"signal {signum}")


EXIT_CODES = """exit codes:
  0    done
  1    the build (or another operation) failed
  2    bad input: a spec, option, file or cloud configuration kiln cannot use; the message names it
  3    the image did not pass the boot gate (kiln publish, kiln build with publish targets)
  130  interrupted (Ctrl-C, SIGTERM); mounts and processes were torn down
  141  the reader of kiln's output went away (kiln plan --json | head)
Errors are one line; -v (before or after the subcommand) adds kiln's debug lines and a traceback."""


def _unexpected(exc: BaseException) -> tuple[int, str]:
    """An exception that is not kiln's own, as (exit code, one line). A cloud configuration that does not
    work (no clouds.yaml entry, missing credentials) is bad input."""
    module = type(exc).__module__.split(".")[0]
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    if module == "keystoneauth1" or type(exc).__name__ == "ConfigException":
        return 2, f"cloud configuration: {first} (give --cloud NAME or set OS_CLOUD; see docs/publishing.md)"
    if isinstance(exc, ValidationError):
        return 2, f"invalid input: {first}"
    return 1, f"{type(exc).__name__}: {first} (an unexpected failure; kiln -v shows the traceback)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    leading = 0
    while leading < len(argv) and argv[leading] in ("-v", "--verbose"):
        leading += 1
    dib = argv[leading:leading + 1] == ["dib"]
    args = parser().parse_args([*argv[:leading], "server", "status"] if dib else argv)
    if dib:
        args.func = lambda _: cmd_dib(argv[leading + 1:])
    verbose = bool(getattr(args, "verbose", False))
    # -v: kiln's debug lines (every subprocess line, the guest's console), not those of the libraries below
    logging.basicConfig(level=logging.INFO, handlers=[_StderrHandler()],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("kiln").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if getattr(args, "quiet", False) and not verbose:  # the stage lines (kiln.build), warnings and errors
        logging.getLogger("kiln").setLevel(logging.WARNING)
        logging.getLogger("kiln.build").setLevel(logging.INFO)
        os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        rc: int = args.func(args)
        sys.stdout.flush()
        return rc
    except KilnError as exc:
        if verbose:
            traceback.print_exc()
        print(f"kiln: error: {redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kiln: interrupted; mounts and processes were torn down", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away: say nothing more, and keep Python from complaining about stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        code, line = _unexpected(exc)
        if verbose:
            traceback.print_exc()
        print(f"kiln: error: {redact(line)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
