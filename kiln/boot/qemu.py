"""Local QEMU boot tests, and the probe that decides between KVM and TCG.

A boot test boots a throw-away overlay of an image with a NoCloud seed and watches the serial console
for the seed's marker and cloud-init's "finished" line. QEMU runs through `kiln.host.run.run` in the
calling thread (its own process group, registered for `terminate_all`, killed on timeout or
exception, and started under `setpriv --pdeathsig KILL` so that even a SIGKILLed kiln takes it along);
the serial console is a unix socket that a helper thread reads, logs and, for the optional login check,
types into; it stops QEMU once the verdict is in. QEMU itself writes the complete console to
`serial-<firmware>.log`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kiln.boot import conformance, guest_agent, guest_ssh
from kiln.boot.serial_console import Login, SerialConsole, serial_tail
from kiln.host.arch import host_arch
from kiln.host.progress import activity
from kiln.host.run import output, run
from kiln.model import facts
from kiln.model.errors import BootTestError, CommandError

log = logging.getLogger("kiln.qemu")

ACCELS = ("kvm", "tcg")
FIRMWARES = ("bios", "uefi", facts.SECURE_BOOT)
ARCHES = tuple(facts.ARCHES)
QEMU_BINARY = {arch: f"qemu-system-{facts.machine_of(arch)}" for arch in ARCHES}
UEFI_FILES = {
    "amd64": (Path("/usr/share/OVMF/OVMF_CODE.fd"), Path("/usr/share/OVMF/OVMF_VARS.fd")),
    "arm64": (Path("/usr/share/AAVMF/AAVMF_CODE.fd"), Path("/usr/share/AAVMF/AAVMF_VARS.fd")),
}
# Secure Boot enforced: OVMF's SMM build, and a variable store with Microsoft's keys enrolled (the UEFI CA
# signs the distributions' shim), as a UEFI cloud offers it
SECURE_BOOT_FILES = {
    "amd64": (Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")),
}
PROBE_TIMEOUT = 15.0
PROBE_CACHE = "accel-probe.json"
DEFAULT_GROW_MIB = 1024

# QEMU's own chatter that says nothing about a failure
_QEMU_NOISE_RE = re.compile(r"QEMU waiting for connection|terminating on signal")


@dataclass(frozen=True)
class BootResult:
    """What a boot test saw. `seconds` runs from QEMU's start to cloud-init's end."""

    firmware: str
    accel: str
    seconds: float
    passed: bool
    root_bytes: int | None
    disk_bytes: int | None
    login_ok: bool | None  # None when no login was asked for
    serial_log: Path
    ssh_ok: bool | None = None  # root's password login over SSH; None when not asked for
    criterion: str = "cloud-init"  # what the pass was judged by (kiln.boot.serial_console.CRITERIA)
    failed_units: list[str] | None = None  # systemd units failed when cloud-init ran the boot test's commands
    reports: conformance.Reports | None = None  # what the conformance suite printed, every boot
    agent: str | None = None  # guest-ping: "" answered, else what went wrong; None when not asked
    fatal: str | None = None  # a fatal console line after the pass (the second boot's), with the line

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for manifest.json)."""
        data = asdict(self)
        data["serial_log"] = str(self.serial_log)
        return data


# ----------------------------------------------------------------------------------------------- argv


def with_parent_death_signal(argv: list[str]) -> list[str]:
    """Prefix `setpriv --pdeathsig KILL` when available, so QEMU dies even if kiln is SIGKILLed."""
    return ["setpriv", "--pdeathsig", "KILL", *argv] if shutil.which("setpriv") else argv


def _opt(path: Path | str) -> str:
    """A path as a QEMU option value (commas are doubled)."""
    return str(path).replace(",", ",,")


def accel_args(accel: str) -> list[str]:
    """QEMU flags for an accelerator."""
    if accel == "kvm":
        return ["-enable-kvm", "-cpu", "host"]
    if accel == "tcg":
        return ["-accel", "tcg,thread=multi", "-cpu", "max"]
    raise ValueError(f"unknown accelerator {accel!r} (expected one of {', '.join(ACCELS)})")


def qemu_argv(
    *,
    arch: str,
    firmware: str,
    accel: str,
    disk: Path,
    seed_iso: Path | None,
    serial_socket: Path,
    serial_log: Path,
    memory_mib: int = 1024,
    cpus: int = 2,
    firmware_code: Path | None = None,
    firmware_vars: Path | None = None,
    name: str = "kiln-boot-test",
    ssh_port: int | None = None,
    agent_socket: Path | None = None,
    control_socket: Path | None = None,
    qmp_socket: Path | None = None,
) -> list[str]:
    """The QEMU command line of a boot test (pure: touches no file).

    `disk` is a qcow2 overlay; `firmware_code`/`firmware_vars` are the UEFI code (read-only) and a
    private copy of the variable store, required for `uefi`.
    """
    if arch not in QEMU_BINARY:
        raise ValueError(f"unknown arch {arch!r} (expected one of {', '.join(ARCHES)})")
    if firmware not in FIRMWARES:
        raise ValueError(f"unknown firmware {firmware!r} (expected one of {', '.join(FIRMWARES)})")
    if firmware not in facts.boot_firmware_of(arch):
        raise ValueError(f"{arch} boots with {' or '.join(facts.boot_firmware_of(arch))} only")
    argv = [QEMU_BINARY[arch], "-name", name]
    secure = firmware == facts.SECURE_BOOT
    # Secure Boot: the firmware's variables are guarded by SMM, and only SMM may write its flash
    argv += ["-machine", ("q35,smm=on" if secure else "q35") if arch == "amd64" else "virt"]
    if secure:
        argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    argv += accel_args(accel)
    # -nographic (with the serial and monitor redirected below) is what makes SeaBIOS print on serial
    argv += ["-m", str(memory_mib), "-smp", str(cpus), "-nodefaults", "-nographic", "-monitor", "none",
             "-boot", "strict=on"]
    if control_socket is None:  # no reboot asked for: a reset ends QEMU (and the boot test) at once
        argv += ["-no-reboot"]
    if qmp_socket is not None:  # a reset from the host, when the firmware stalls after the guest's reboot
        argv += ["-qmp", f"unix:{_opt(qmp_socket)},server=on,wait=off"]
    if firmware != "bios":
        if firmware_code is None or firmware_vars is None:
            raise ValueError(f"{firmware} needs firmware_code and firmware_vars")
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_opt(firmware_code)}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={_opt(firmware_vars)}"]
    argv += ["-drive", f"file={_opt(disk)},if=none,id=disk0,format=qcow2,cache=unsafe,discard=unmap",
             "-device", "virtio-blk-pci,drive=disk0,bootindex=0"]
    if seed_iso is not None:
        argv += ["-drive", f"file={_opt(seed_iso)},if=none,id=seed0,format=raw,readonly=on",
                 "-device", "virtio-blk-pci,drive=seed0"]
    # SeaBIOS gets no option ROM, so it wastes no time trying to boot from the network; UEFI keeps the NIC's
    # iPXE ROM, as Nova's guests have it: without it, OVMF's own virtio-net driver leaves the NIC in a state in
    # which the distribution's signed GRUB spins forever after a warm reset (the reboot of the conformance
    # suite), a hang no cloud's guest meets. `-boot strict=on` keeps the firmware from booting the network.
    # restrict=on: the guest gets DHCP and nothing beyond; it cannot reach the host's loopback (10.0.2.2), where
    # the Prefect API, the S3 server and the OpenStack services listen, nor anything else
    # (with ssh_port, the guest's port 22 is reachable from the host's 127.0.0.1:ssh_port; still not the reverse)
    hostfwd = f",hostfwd=tcp:127.0.0.1:{int(ssh_port)}-:22" if ssh_port else ""
    nic = "virtio-net-pci,netdev=net0" + (",romfile=" if firmware == "bios" else "")
    argv += ["-netdev", f"user,id=net0,restrict=on{hostfwd}", "-device", nic]
    argv += ["-device", "virtio-rng-pci"]
    ports = [(sock, port) for sock, port in ((agent_socket, guest_agent.PORT_NAME),
                                             (control_socket, conformance.CONTROL_PORT)) if sock is not None]
    if ports:  # the guest agent's channel, and the one the host tells the conformance suite to reboot through
        argv += ["-device", "virtio-serial-pci,id=vser0"]
        for i, (sock, port) in enumerate(ports):
            argv += ["-chardev", f"socket,id=port{i},path={_opt(sock)},server=on,wait=off",
                     "-device", f"virtserialport,bus=vser0.0,chardev=port{i},name={port}"]
    argv += ["-chardev", f"socket,id=serial0,path={_opt(serial_socket)},server=on,wait=on,"
                         f"logfile={_opt(serial_log)},logappend=off",
             "-serial", "chardev:serial0"]
    return argv


def probe_argv(kernel: Path, arch: str | None = None, accel: str = "kvm") -> list[str]:
    """The QEMU command line of the KVM probe: a direct kernel boot that panics without a root."""
    arch = arch or host_arch()
    console = facts.serial_console_of(arch)
    return [QEMU_BINARY[arch], "-machine", "q35" if arch == "amd64" else "virt", *accel_args(accel),
            "-m", "256", "-smp", "1", "-nodefaults", "-nographic", "-monitor", "none", "-serial", "stdio",
            "-no-reboot", "-kernel", str(kernel),
            "-append", f"console={console} panic=-1 rdinit=/nonexistent"]


# ---------------------------------------------------------------------------------------------- probe


class _ProbeDone(Exception):
    """Raised from the probe's line callback to stop QEMU as soon as the verdict is known."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def qemu_version(binary: str) -> str:
    """First line of `qemu-system-* --version`."""
    return output([binary, "--version"]).splitlines()[0].strip()


def _probe_kvm(kernel: Path, timeout: float, accel: str = "kvm") -> tuple[bool, str]:
    """Boot `kernel` under KVM; True when it prints past decompression to its panic within `timeout`.

    (`accel` is there so tests can check the verdict logic under TCG.)
    """
    seen: dict[str, bool] = {"version": False, "later": False}

    def on_line(line: str) -> None:
        if "Linux version" in line:
            seen["version"] = True
        elif seen["version"] and ("Kernel panic" in line or "Run /" in line or "VFS:" in line):
            seen["later"] = True
            raise _ProbeDone

    start = time.monotonic()
    try:
        done = run(with_parent_death_signal(probe_argv(kernel, accel=accel)), timeout=timeout, check=False,
                   quiet=True, on_line=on_line, what="KVM probe")
        detail = f"QEMU exited with code {done.returncode}"
    except _ProbeDone:
        detail = "the kernel ran to its panic"
    except CommandError as exc:
        detail = f"no verdict within {timeout:.0f} s" if exc.returncode is None else str(exc).splitlines()[0]
    took = time.monotonic() - start
    ok = seen["version"] and seen["later"]
    if not ok and seen["version"]:
        detail += "; the kernel started but stalled"
    elif not ok:
        detail += "; the kernel printed nothing"
    return ok, f"{detail} ({took:.1f} s)"


def _kvm_possible(binary: str) -> bool:
    return shutil.which(binary) is not None and os.access("/dev/kvm", os.R_OK | os.W_OK)


def probe_accel(kernel: Path | None, *, state_dir: Path | None = None, timeout: float = PROBE_TIMEOUT) -> str:
    """"kvm" if KVM really runs a guest on this host, else "tcg"; env KILN_ACCEL=kvm|tcg overrides.

    /dev/kvm opening is no proof (nested guests hang after the kernel decompresses), so `kernel` (one
    for the host's architecture) is booted under KVM with a deadline. Verdicts are cached in
    `state_dir/accel-probe.json`, keyed by the kernel's sha256, the QEMU version and the host kernel.
    """
    forced = os.environ.get("KILN_ACCEL", "").strip().lower()
    if forced:
        if forced not in ACCELS:
            raise ValueError(f"KILN_ACCEL={forced!r}: expected one of {', '.join(ACCELS)}")
        log.info("accelerator %s (from KILN_ACCEL)", forced)
        return forced
    if kernel is None:
        return "tcg"
    binary = QEMU_BINARY.get(host_arch())
    if binary is None or not _kvm_possible(binary):
        log.info("accelerator tcg: no /dev/kvm or no %s", binary or f"QEMU for {host_arch()}")
        return "tcg"
    key = f"{_sha256(Path(kernel))} {qemu_version(binary)} host={platform.release()}"
    cache_file = Path(state_dir) / PROBE_CACHE if state_dir is not None else None
    cache: dict[str, Any] = {}
    if cache_file is not None:
        try:
            cache = json.loads(cache_file.read_text())
        except (FileNotFoundError, ValueError):
            cache = {}
        entry = cache.get(key)
        if isinstance(entry, dict) and entry.get("accel") in ACCELS:
            log.info("accelerator %s (cached probe: %s)", entry["accel"], entry.get("detail", ""))
            return str(entry["accel"])
    ok, detail = _probe_kvm(Path(kernel), timeout)
    accel = "kvm" if ok else "tcg"
    log.info("accelerator %s (KVM probe: %s)", accel, detail)
    if cache_file is not None:
        cache[key] = {"accel": accel, "detail": detail, "checked_at": time.time()}
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=2, sort_keys=True) + "\n")
        tmp.replace(cache_file)
    return accel


# ------------------------------------------------------------------------------------------ boot test


BOOTABLE_FORMATS = ("qcow2", "raw")


def _image_info(image: Path) -> tuple[str, int]:
    """(format, virtual size) of a disk to boot, which may be a stranger's build: only a self-contained raw
    or qcow2 is booted; a qcow2 naming a backing or data file (a host file or disk the guest would read,
    the class of OSSA-2024-001) is refused."""
    info = json.loads(output(["qemu-img", "info", "-U", "--output=json", str(image)]))
    fmt = str(info.get("format"))
    if fmt not in BOOTABLE_FORMATS:
        raise BootTestError(f"{image.name}: a {fmt} disk; the boot test boots {' or '.join(BOOTABLE_FORMATS)}")
    external = info.get("full-backing-filename") or info.get("backing-filename") or (
        (info.get("format-specific") or {}).get("data") or {}).get("data-file")
    if external:
        raise BootTestError(f"{image.name}: the disk names another file ({str(external)[:120]!r}) that QEMU "
                            "would read as part of it: refused")
    return fmt, int(info["virtual-size"])


def _validate(firmware: str, arch: str, accel: str) -> None:
    if firmware not in FIRMWARES:
        raise ValueError(f"unknown firmware {firmware!r} (expected one of {', '.join(FIRMWARES)})")
    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r} (expected one of {', '.join(ARCHES)})")
    if accel not in ACCELS:
        raise ValueError(f"unknown accelerator {accel!r} (expected one of {', '.join(ACCELS)})")


def boot_test(
    image: Path,
    *,
    firmware: str,
    arch: str = "amd64",
    marker: str,
    seed_iso: Path,
    workdir: Path,
    accel: str,
    memory_mib: int = 1024,
    cpus: int = 2,
    timeout: float,
    extra_login: tuple[str, str] | None = None,
    ssh_login: bool = False,
    criterion: str = "cloud-init",
    grow_mib: int = DEFAULT_GROW_MIB,
    suite_boots: int = 0,
    agent: bool = False,
) -> BootResult:
    """Boot a throw-away overlay of `image` and wait for `marker` and cloud-init's end on the console.

    The image is never written. The overlay is `grow_mib` larger than the image so growroot has work
    to do. With `extra_login=(user, password)` it then logs in on the serial console and runs a
    command (`login_ok`); with `ssh_login` too, it logs in over SSH with that password (`ssh_ok`).
    With `suite_boots`, it waits for the conformance suite's report (kiln.boot.conformance), pings the guest
    agent (`agent`), and for 2, tells the guest to reboot and waits for the second report.
    Raises BootTestError (firmware, reason, console tail) when the boot does not
    pass within `timeout` seconds. QEMU never outlives the call.
    """
    _validate(firmware, arch, accel)
    image = Path(image).resolve()
    workdir = Path(workdir)
    if accel == "kvm" and arch != host_arch():
        log.info("boot test %s/%s: KVM cannot run %s guests on this %s host, using TCG",
                 arch, firmware, arch, host_arch())
        accel = "tcg"
    binary = QEMU_BINARY[arch]
    if shutil.which(binary) is None:
        raise BootTestError(f"boot test ({arch}/{firmware}): {binary} is not installed")
    uefi: tuple[Path, Path] | None = None
    if firmware != "bios":
        uefi = UEFI_FILES[arch] if firmware == "uefi" else SECURE_BOOT_FILES[arch]
        missing = [str(p) for p in uefi if not p.exists()]
        if missing:
            raise BootTestError(f"boot test ({arch}/{firmware}): UEFI firmware missing: {', '.join(missing)}")

    workdir.mkdir(parents=True, exist_ok=True)
    serial_log = workdir / f"serial-{firmware}.log"
    serial_log.unlink(missing_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".boot-{firmware}-", dir=workdir))
    # unix socket paths are limited to ~107 bytes: keep the socket out of a possibly deep workdir
    sockdir = Path(tempfile.mkdtemp(prefix="kiln-qemu-"))
    console: SerialConsole | None = None
    try:
        fmt, size = _image_info(image)
        ssh_port = guest_ssh.free_port() if ssh_login and extra_login else None
        overlay = scratch / "overlay.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image), "-F", fmt, str(overlay),
             str(size + grow_mib * 1024 * 1024)], quiet=True, what="create the boot-test overlay")
        vars_copy: Path | None = None
        if uefi is not None:
            vars_copy = scratch / "efivars.fd"
            shutil.copyfile(uefi[1], vars_copy)
        argv = qemu_argv(arch=arch, firmware=firmware, accel=accel, disk=overlay,
                         seed_iso=Path(seed_iso).resolve(), serial_socket=sockdir / "serial.sock",
                         serial_log=serial_log.resolve(),
                         memory_mib=memory_mib, cpus=cpus, firmware_code=uefi[0] if uefi else None,
                         firmware_vars=vars_copy, name=f"kiln-boot-{firmware}", ssh_port=ssh_port,
                         agent_socket=sockdir / "agent.sock" if agent and suite_boots else None,
                         control_socket=sockdir / "control.sock" if suite_boots > 1 else None,
                         qmp_socket=sockdir / "qmp.sock" if suite_boots > 1 else None)
        log.info("boot test %s/%s (%s) of %s, timeout %.0f s", arch, firmware, accel, image.name, timeout)
        start = time.monotonic()
        login = Login(*extra_login) if extra_login else None
        returncode: int | None = None
        qemu_out: list[str] = []
        reason: str | None = None
        with activity(f"boot {arch}/{firmware} ({accel})") as note:
            console = SerialConsole(sockdir / "serial.sock", marker, login=login, deadline=start + timeout,
                                    ssh_port=ssh_port, criterion=criterion, on_line=note, suite_boots=suite_boots,
                                    agent_socket=sockdir / "agent.sock" if agent and suite_boots else None,
                                    control_socket=sockdir / "control.sock" if suite_boots > 1 else None,
                                    qmp_socket=sockdir / "qmp.sock" if suite_boots > 1 else None)
            console.start()
            try:
                done = run(with_parent_death_signal(argv), timeout=timeout, check=False, quiet=True,
                           what=f"QEMU ({firmware})")
                returncode, qemu_out = done.returncode, done.lines
            except CommandError as exc:
                qemu_out, reason = exc.tail, str(exc).splitlines()[0]  # timed out, or could not start
        console.stopping.set()
        console.join(timeout=15)
        state = console.state
        facts = state.facts
        if facts.passed and state.passed_at is not None:
            result = BootResult(firmware=firmware, accel=accel, seconds=round(state.passed_at - start, 1),
                                passed=True, root_bytes=facts.root_bytes, disk_bytes=facts.disk_bytes,
                                login_ok=state.login_ok, serial_log=serial_log, ssh_ok=state.ssh_ok,
                                criterion=criterion, failed_units=facts.failed_units,
                                reports=facts.reports if suite_boots else None, agent=state.agent,
                                fatal=facts.fatal and facts.fatal + (f" ({facts.fatal_line})" if facts.fatal_line
                                                                     else ""))
            log.info("boot test %s/%s passed in %.0f s by %s (root %s bytes, disk %s bytes%s)", arch, firmware,
                     result.seconds, facts.describe, result.root_bytes, result.disk_bytes,
                     "" if result.login_ok is None else f", login {'ok' if result.login_ok else 'FAILED'}"
                     + ("" if result.ssh_ok is None else f", ssh {'ok' if result.ssh_ok else 'FAILED'}"))
            if facts.failed_units:
                log.warning("boot test %s/%s: failed systemd units in the guest: %s", arch, firmware,
                            ", ".join(facts.failed_units))
            return result
        if facts.fatal is not None:
            reason = facts.fatal + (f" ({facts.fatal_line})" if facts.fatal_line else "")
        elif reason is None:
            reason = f"QEMU exited with code {returncode}" + (
                " (the guest powered off or reset)" if returncode == 0 else "")
        if criterion == "systemd":
            reason += (f"; judged by {facts.describe}: "
                       + ("multi-user target reached, no login prompt" if facts.multi_user_seen else
                          "multi-user target never reached"))
        elif not facts.fatal and facts.marker_seen != facts.finished_seen:
            reason += "; seen: " + ("the marker" if facts.marker_seen else "cloud-init's end, no marker")
        if state.error is not None:
            reason += f"; console reader error: {state.error!r}"
        raise BootTestError(_failure_message(arch, firmware, accel, image, reason, serial_log, qemu_out))
    finally:
        if console is not None and console.is_alive():
            console.stopping.set()
            console.join(timeout=15)
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(sockdir, ignore_errors=True)


def _failure_message(arch: str, firmware: str, accel: str, image: Path, reason: str, serial_log: Path,
                     qemu_out: list[str]) -> str:
    tail = serial_tail(serial_log)
    text = f"boot test {arch}/{firmware} ({accel}) of {image.name} failed: {reason}"
    said = [line for line in qemu_out if line.strip() and not _QEMU_NOISE_RE.search(line)]
    if said:
        text += "\n  QEMU said:\n" + "\n".join(f"    {line}" for line in said[-10:])
    text += f"\n  serial console ({serial_log}), last {len(tail)} lines:"
    text += ("\n" + "\n".join(f"    {line}" for line in tail)) if tail else " (empty)"
    return text

