"""kiln.qemu and kiln.seed: seed ISOs, console parsing, the accelerator probe, QEMU command lines, boots."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln.boot import qemu, serial_console
from kiln.boot.qemu import (
    BootResult,
    accel_args,
    boot_test,
    probe_accel,
    probe_argv,
    qemu_argv,
)
from kiln.boot.seed import boot_test_meta_data, boot_test_user_data, make_nocloud_seed
from kiln.boot.serial_console import SerialFacts, clean_console, serial_tail
from kiln.model.errors import BootTestError

REPO = Path(__file__).resolve().parents[1]


def qemu_pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains `text` (our tmp_path: other people's QEMUs don't count)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmdline and text in cmdline:
            pids.append(int(entry.name))
    return pids


def zero_disk(path: Path, size: int = 64 << 20) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


# ----------------------------------------------------------------------------------------- user-data


def test_user_data_is_cloud_config_with_marker() -> None:
    text = boot_test_user_data("kiln-abc123")
    assert text.startswith("#cloud-config\n")
    data = yaml.safe_load(text)
    script = data["runcmd"][0]
    assert script[:2] == ["sh", "-c"]
    assert "KILN-MARKER=kiln-abc123" in script[2]
    assert "KILN-ROOT-BYTES=" in script[2] and "df -B1 --output=size /" in script[2]
    assert "KILN-DISK-BYTES=" in script[2] and "lsblk -bdno SIZE" in script[2]
    assert "chpasswd" not in data and "ssh_pwauth" not in data


def test_user_data_password_and_extra_runcmd() -> None:
    data = yaml.safe_load(boot_test_user_data("m1", root_password="s3cr:et #1", extra_runcmd=["touch /x"]))
    assert data["chpasswd"] == {"expire": False,
                                "users": [{"name": "root", "password": "s3cr:et #1", "type": "text"}]}
    assert data["ssh_pwauth"] is True
    assert data["runcmd"][-1] == "touch /x"


def test_user_data_rejects_unsafe_marker() -> None:
    with pytest.raises(ValueError):
        boot_test_user_data("a b; rm -rf /")


def test_user_data_script_runs(tmp_path: Path) -> None:
    """The script itself works in a plain shell (on the host's root)."""
    script = yaml.safe_load(boot_test_user_data("kiln-run-1"))["runcmd"][0][2]
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout
    facts = SerialFacts.parse(out, "kiln-run-1")
    assert facts.marker_seen
    assert facts.root_bytes and facts.root_bytes > 0
    assert facts.failed_units is not None  # reported (empty here: this host's systemctl lists none)


def test_failed_units_are_read_from_the_console() -> None:
    line = "[   31.5] cloud-init[486]: KILN-FAILED-UNITS=cloud-config.service,networking.service"
    assert SerialFacts.parse(line, "m").failed_units == ["cloud-config.service", "networking.service"]
    assert SerialFacts.parse("cloud-init[1]: KILN-FAILED-UNITS=", "m").failed_units == []
    assert SerialFacts.parse("nothing reported", "m").failed_units is None


# ---------------------------------------------------------------------------------------------- seed


def test_seed_iso_contains_files(tmp_path: Path) -> None:
    iso = make_nocloud_seed(tmp_path / "seed.iso", user_data=boot_test_user_data("m2"),
                            meta_data=boot_test_meta_data(), network_config="version: 2\n")
    assert iso.is_file() and not list(tmp_path.glob(".*partial"))
    listing = subprocess.run(["xorriso", "-indev", str(iso), "-find"], capture_output=True, text=True,
                             check=True).stdout
    names = {line.strip().strip("'").lstrip(".") for line in listing.splitlines()}
    assert {"/user-data", "/meta-data", "/network-config"} <= names
    info = subprocess.run(["isoinfo", "-d", "-i", str(iso)], capture_output=True, text=True,
                          check=True).stdout
    assert "Volume id: cidata" in info
    extracted = subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", "/user-data",
                                str(tmp_path / "ud")], capture_output=True, check=True)
    assert extracted.returncode == 0
    assert (tmp_path / "ud").read_text().startswith("#cloud-config")


def test_meta_data_has_fresh_instance_id() -> None:
    a, b = yaml.safe_load(boot_test_meta_data()), yaml.safe_load(boot_test_meta_data("h"))
    assert a["instance-id"] != b["instance-id"] and b["local-hostname"] == "h"


# ------------------------------------------------------------------------------------ console parsing

SAMPLE_LOG = textwrap.dedent("""\
    \x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16.2-debian-1.16.2-1)\r
    Booting from Hard Disk...\r
    [   85.018753] cloud-init[529]: Cloud-init v. 22.4.2 running 'modules:final' at X. Up 84.37 seconds.\r
    KILN-MARKER=kiln-5d8f\r
    [   85.854061] cloud-init[529]: KILN-ROOT-BYTES=4016263168\r
    [   86.517847] cloud-init[529]: KILN-DISK-BYTES=4294967296\r
    \x1b[0;32m  OK  \x1b[0m] Finished cloud-final.service\r
    [   89.688776] cloud-init[529]: Cloud-init v. 22.4.2 finished at Sun, 29 Nov 2026 03:31:11 +0000. \
    Datasource DataSourceNoCloud [seed=/dev/vdb][dsmode=net].  Up 89.45 seconds\r
    """)


def test_serial_parse_pass() -> None:
    facts = SerialFacts.parse(SAMPLE_LOG, "kiln-5d8f")
    assert facts.passed and facts.fatal is None
    assert (facts.root_bytes, facts.disk_bytes) == (4016263168, 4294967296)


def test_serial_parse_needs_both_marker_and_finish() -> None:
    assert not SerialFacts.parse(SAMPLE_LOG, "kiln-other").passed
    no_finish = "\n".join(line for line in SAMPLE_LOG.splitlines() if "finished" not in line)
    facts = SerialFacts.parse(no_finish, "kiln-5d8f")
    assert facts.marker_seen and not facts.passed
    # the user-data's literal text is not a size
    assert SerialFacts.parse('say "KILN-ROOT-BYTES=$(df -B1)"', "x").root_bytes is None


@pytest.mark.parametrize(("line", "reason"), [
    ("No bootable device.", "no bootable device"),
    ('BdsDxe: starting Boot0002 "EFI Internal Shell" from Fv(...)', "shell"),
    ("[    1.2] Kernel panic - not syncing: VFS: Unable to mount root fs", "panicked"),
    ("ALERT!  UUID=1234 does not exist.  Dropping to a shell!", "initramfs"),
    ("Entering rescue mode...", "rescue"),
])
def test_serial_fatal_lines(line: str, reason: str) -> None:
    facts = SerialFacts.parse("Booting...\n" + line + "\n", "m")
    assert facts.fatal is not None and reason in facts.fatal


def test_clean_console_and_tail(tmp_path: Path) -> None:
    assert clean_console("\x1b[0;32m  OK  \x1b[0m] Started\r") == "  OK  ] Started"
    log = tmp_path / "serial.log"
    log.write_bytes(b"".join(f"line {i}\r\n".encode() for i in range(100)) + b"\x1b[2Jredraw\rlast")
    tail = serial_tail(log, 5)
    assert tail == ["line 97", "line 98", "line 99", "redraw", "last"]
    assert serial_tail(tmp_path / "missing.log") == []


# ----------------------------------------------------------------------------------------------- accel


def test_kiln_accel_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(qemu, "_probe_kvm", lambda *a, **k: pytest.fail("must not probe"))
    monkeypatch.setenv("KILN_ACCEL", "kvm")
    assert probe_accel(None) == "kvm"
    assert probe_accel(tmp_path / "vmlinuz", state_dir=tmp_path) == "kvm"
    monkeypatch.setenv("KILN_ACCEL", "TCG")
    assert probe_accel(tmp_path / "vmlinuz") == "tcg"
    monkeypatch.setenv("KILN_ACCEL", "hvf")
    with pytest.raises(ValueError, match="KILN_ACCEL"):
        probe_accel(None)
    monkeypatch.delenv("KILN_ACCEL")
    assert probe_accel(None) == "tcg"


def test_probe_verdict_is_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KILN_ACCEL", raising=False)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not really a kernel")
    calls: list[Path] = []

    def fake_probe(k: Path, timeout: float) -> tuple[bool, str]:
        calls.append(k)
        return True, "fake"

    monkeypatch.setattr(qemu, "_probe_kvm", fake_probe)
    monkeypatch.setattr(qemu, "_kvm_possible", lambda binary: True)
    monkeypatch.setattr(qemu, "qemu_version", lambda binary: "QEMU emulator version 7.2.22")
    state = tmp_path / "state"
    assert probe_accel(kernel, state_dir=state) == "kvm"
    assert probe_accel(kernel, state_dir=state) == "kvm"
    assert len(calls) == 1
    cache = (state / qemu.PROBE_CACHE).read_text()
    assert "7.2.22" in cache and '"accel": "kvm"' in cache
    # another QEMU version is another key
    monkeypatch.setattr(qemu, "qemu_version", lambda binary: "QEMU emulator version 9.0")
    assert probe_accel(kernel, state_dir=state) == "kvm"
    assert len(calls) == 2
    # no /dev/kvm: TCG without probing
    monkeypatch.setattr(qemu, "_kvm_possible", lambda binary: False)
    assert probe_accel(kernel) == "tcg"
    assert len(calls) == 2


def test_image_info_ignores_qemu_img_s_warnings_on_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu-img warns on stderr (a locked image, a deprecated option) and prints its JSON on stdout: the JSON
    is read alone."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "qemu-img"
    fake.write_text("#!/bin/sh\n"
                    "echo 'qemu-img: warning: Failed to get shared \"write\" lock' >&2\n"
                    "echo '{\"format\": \"qcow2\", \"virtual-size\": 2147483648}'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert qemu._image_info(tmp_path / "image.qcow2") == ("qcow2", 2147483648)


def test_probe_argv() -> None:
    argv = probe_argv(Path("/k/vmlinuz"), "amd64")
    assert argv[0] == "qemu-system-x86_64"
    assert argv[argv.index("-kernel") + 1] == "/k/vmlinuz"
    assert "-enable-kvm" in argv and argv[argv.index("-cpu") + 1] == "host"
    assert argv[argv.index("-append") + 1] == "console=ttyS0 panic=-1 rdinit=/nonexistent"
    assert "-no-reboot" in argv
    assert "console=ttyAMA0" in probe_argv(Path("/k"), "arm64")[-1]


# ------------------------------------------------------------------------------------------------ argv


def _argv(**kw: object) -> list[str]:
    args: dict[str, object] = dict(arch="amd64", firmware="bios", accel="tcg", disk=Path("/w/overlay.qcow2"),
                                   seed_iso=Path("/w/seed.iso"), serial_socket=Path("/s/serial.sock"),
                                   serial_log=Path("/w/serial-bios.log"))
    args.update(kw)
    return qemu_argv(**args)  # type: ignore[arg-type]


def _pairs(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_argv_ssh_port_forwards_only_from_the_hosts_loopback_and_keeps_the_guest_restricted() -> None:
    [netdev] = _pairs(_argv(ssh_port=40022), "-netdev")
    assert netdev == "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22"


def test_argv_bios_tcg() -> None:
    argv = _argv(memory_mib=2048, cpus=2)
    assert argv[0] == "qemu-system-x86_64"
    assert _pairs(argv, "-machine") == ["q35"]
    assert _pairs(argv, "-accel") == ["tcg,thread=multi"] and _pairs(argv, "-cpu") == ["max"]
    assert _pairs(argv, "-m") == ["2048"] and _pairs(argv, "-smp") == ["2"]
    assert {"-nographic", "-nodefaults", "-no-reboot"} <= set(argv)
    assert not any("pflash" in a for a in argv)
    drives = _pairs(argv, "-drive")
    assert drives[0].startswith("file=/w/overlay.qcow2,") and "format=qcow2" in drives[0]
    assert drives[1].startswith("file=/w/seed.iso,") and "readonly=on" in drives[1]
    devices = _pairs(argv, "-device")
    assert "virtio-blk-pci,drive=disk0,bootindex=0" in devices
    assert "virtio-blk-pci,drive=seed0" in devices
    assert any(d.startswith("virtio-net-pci,netdev=net0") for d in devices)
    assert _pairs(argv, "-netdev") == ["user,id=net0,restrict=on"]
    chardev = _pairs(argv, "-chardev")[0]
    assert chardev.startswith("socket,id=serial0,path=/s/serial.sock,server=on,wait=on")
    assert "logfile=/w/serial-bios.log" in chardev
    assert _pairs(argv, "-serial") == ["chardev:serial0"] and _pairs(argv, "-monitor") == ["none"]


def test_argv_uefi_kvm() -> None:
    argv = _argv(firmware="uefi", accel="kvm", firmware_code=Path("/usr/share/OVMF/OVMF_CODE.fd"),
                 firmware_vars=Path("/w/vars.fd"))
    assert "-enable-kvm" in argv and _pairs(argv, "-cpu") == ["host"] and "-accel" not in argv
    drives = _pairs(argv, "-drive")
    assert drives[0] == "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE.fd"
    assert drives[1] == "if=pflash,format=raw,unit=1,file=/w/vars.fd"
    with pytest.raises(ValueError):
        _argv(firmware="uefi")


def test_argv_arm64() -> None:
    code, vars_ = qemu.UEFI_FILES["arm64"]
    argv = _argv(arch="arm64", firmware="uefi", firmware_code=code, firmware_vars=Path("/w/vars.fd"))
    assert argv[0] == "qemu-system-aarch64"
    assert _pairs(argv, "-machine") == ["virt"] and _pairs(argv, "-cpu") == ["max"]
    assert _pairs(argv, "-drive")[0].endswith("file=/usr/share/AAVMF/AAVMF_CODE.fd")
    assert vars_.name == "AAVMF_VARS.fd"
    with pytest.raises(ValueError, match="arm64 boots with uefi only"):
        _argv(arch="arm64", firmware="bios")


def test_argv_escapes_commas_and_rejects_unknowns() -> None:
    argv = _argv(disk=Path("/w/a,b.qcow2"))
    assert _pairs(argv, "-drive")[0].startswith("file=/w/a,,b.qcow2,")
    with pytest.raises(ValueError):
        _argv(accel="hvf")
    with pytest.raises(ValueError):
        accel_args("xen")
    with pytest.raises(ValueError):
        _argv(firmware="coreboot")


# --------------------------------------------------------------------------- serial console (no VM)


def _fake_getty(
    path: Path, password: str, transcript: list[bytes], killed: threading.Event
) -> threading.Thread:
    """A unix-socket server that talks like a guest's console: cloud-init's end, then getty and a shell."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        conn.settimeout(0.2)
        with conn, server:
            conn.sendall(b"KILN-MARKER=m-fake\r\nKILN-ROOT-BYTES=10\r\n"
                         b"[ 9.9] cloud-init[1]: Cloud-init v. 22.4.2 finished at now\r\n")
            state, buf = "login", b""
            while not killed.is_set():
                try:
                    data = conn.recv(1024)
                except TimeoutError:
                    continue
                if not data:
                    return
                transcript.append(data)
                buf += data
                while b"\r" in buf:
                    line, buf = buf.split(b"\r", 1)
                    text = line.decode()
                    if state == "login":
                        if text:
                            state = "password"
                            conn.sendall(b"Password: ")
                        else:
                            conn.sendall(b"\r\nfake login: ")
                    elif state == "password":
                        state = "shell" if text == password else "login"
                        conn.sendall(b"\r\nroot@fake:~# " if state == "shell" else b"\r\nLogin incorrect\r\n")
                    elif text.startswith("echo "):
                        # what a shell does with $((40+2))
                        conn.sendall(text.encode() + b"\r\nKILN-LOGIN-42\r\nroot@fake:~# ")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(("typed", "ok"), [("pw", True), ("wrong", False)])
def test_console_login_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, typed: str, ok: bool) -> None:
    # the fake peer is this very process: never signal it, just hang up like a killed QEMU would
    killed = threading.Event()
    monkeypatch.setattr(serial_console.SerialConsole, "_signal", lambda self, sig: killed.set())
    transcript: list[bytes] = []
    sock = tmp_path / "s.sock"
    server = _fake_getty(sock, "pw", transcript, killed)
    console = serial_console.SerialConsole(sock, "m-fake", login=serial_console.Login("root", typed),
                                  deadline=time.monotonic() + 60)
    monkeypatch.setattr(serial_console, "MARKER_GRACE", 0.1)
    start = time.monotonic()
    console.start()
    console.join(timeout=90)
    assert time.monotonic() - start < 10
    assert not console.is_alive()
    assert console.state.error is None
    assert console.state.facts.passed and console.state.facts.root_bytes == 10
    assert console.state.login_ok is ok
    assert transcript[0] == b"\r" and b"root\r" in transcript
    server.join(timeout=1)


def _fake_console(path: Path, text: bytes, killed: threading.Event) -> threading.Thread:
    """A guest console that says `text` and then nothing until it is killed (or hangs up at once when the
    text ends with a newline)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn, server:
            conn.sendall(text)
            if not text.endswith(b"\n"):
                killed.wait(30)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(("text", "passed"), [
    (b"[  OK  ] Reached target multi-user.target - Multi-User System.\r\n\r\nDebian GNU/Linux 12 x ttyS0\r\n"
     b"\r\nx login: ", True),
    (b"[  OK  ] Reached target multi-user.target - Multi-User System.\r\n", False),  # no prompt: hung up
    (b"\r\nx login: ", False),  # a prompt before multi-user (an emergency getty, say) is not enough
])
def test_an_image_without_cloud_init_is_judged_by_systemd_and_its_login_prompt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: bytes, passed: bool) -> None:
    killed = threading.Event()
    monkeypatch.setattr(serial_console.SerialConsole, "_signal", lambda self, sig: killed.set())
    sock = tmp_path / "s.sock"
    server = _fake_console(sock, text if passed or text.endswith(b"\n") else text + b"\r\n", killed)
    console = serial_console.SerialConsole(sock, "m-unused", login=None, deadline=time.monotonic() + 5,
                                           criterion="systemd")
    console.start()
    console.join(timeout=20)
    assert not console.is_alive() and console.state.error is None
    facts = console.state.facts
    assert facts.passed is passed
    assert "systemd's multi-user target and a login prompt" in facts.describe
    assert not facts.marker_seen  # never asked for: the seed is not read without cloud-init
    server.join(timeout=1)


# ---------------------------------------------------------------------------------------- real QEMU


def test_boot_without_bootloader_fails(tmp_path: Path) -> None:
    """An all-zero disk: BootTestError with the console's tail, fast, and no QEMU left behind."""
    disk = zero_disk(tmp_path / "zero.raw")
    seed = make_nocloud_seed(tmp_path / "seed.iso", user_data=boot_test_user_data("m-zero"),
                             meta_data=boot_test_meta_data())
    before = disk.read_bytes()[:4096]
    start = time.monotonic()
    with pytest.raises(BootTestError) as err:
        boot_test(disk, firmware="bios", marker="m-zero", seed_iso=seed, workdir=tmp_path / "w",
                  accel="tcg", timeout=40)
    assert time.monotonic() - start < 45
    text = str(err.value)
    assert "bios" in text and "no bootable device" in text
    assert "serial console" in text and "Boot failed" in text  # the tail is in the message
    assert (tmp_path / "w" / "serial-bios.log").is_file()
    assert not list((tmp_path / "w").glob(".boot-*"))  # overlay removed
    assert disk.read_bytes()[:4096] == before
    assert qemu_pids_mentioning(str(tmp_path)) == []


def test_boot_timeout_kills_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the fail-fast patterns off, the zero disk hangs in the firmware until the timeout."""
    monkeypatch.setattr(serial_console, "FATAL_PATTERNS", ())
    disk = zero_disk(tmp_path / "zero.raw")
    seed = make_nocloud_seed(tmp_path / "seed.iso", user_data="#cloud-config\n", meta_data="instance-id: x\n")
    start = time.monotonic()
    with pytest.raises(BootTestError, match="timed out after 6 s"):
        boot_test(disk, firmware="uefi", marker="m", seed_iso=seed, workdir=tmp_path / "w", accel="tcg",
                  timeout=6)
    assert time.monotonic() - start < 20
    assert qemu_pids_mentioning(str(tmp_path)) == []
    assert not list((tmp_path / "w").glob(".boot-*"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_boot_interrupted_kills_qemu(tmp_path: Path, sig: signal.Signals) -> None:
    """Ctrl-C (or even SIGKILL of kiln) in the middle of a boot: QEMU does not survive it."""
    disk = zero_disk(tmp_path / "zero.raw")
    script = textwrap.dedent(f"""
        from pathlib import Path
        from kiln.boot import qemu, serial_console
        from kiln.boot.seed import make_nocloud_seed
        serial_console.FATAL_PATTERNS = ()
        w = Path({str(tmp_path)!r})
        seed = make_nocloud_seed(w / "seed.iso", user_data="#cloud-config\\n", meta_data="instance-id: x\\n")
        qemu.boot_test(w / "zero.raw", firmware="bios", marker="m", seed_iso=seed, workdir=w / "w",
                       accel="tcg", timeout=120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not qemu_pids_mentioning(str(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert qemu_pids_mentioning(str(tmp_path)), "QEMU never started"
        time.sleep(1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10  # after SIGKILL the kernel delivers the death signal, then init reaps
    while qemu_pids_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_pids_mentioning(str(tmp_path)) == []
    if sig == signal.SIGINT:
        assert "KeyboardInterrupt" in err
        assert not list((tmp_path / "w").glob(".boot-*"))
    assert disk.stat().st_size == 64 << 20


@pytest.mark.slow
def test_probe_logic_with_real_kernel(default_kernel: Path) -> None:
    """The probe's verdict logic, run under TCG (which always works) with the default image's kernel (or
    KILN_TEST_KERNEL)."""
    kernel = os.environ.get("KILN_TEST_KERNEL") or str(default_kernel)
    ok, detail = qemu._probe_kvm(Path(kernel), 60, accel="tcg")
    assert ok, detail


@pytest.mark.slow
def test_boot_real_image_bios(tmp_path: Path, seed_build: tuple[Path, dict[str, Any], float]) -> None:
    """Boot the seed example's image (it lets root in with a password; or KILN_TEST_IMAGE) under SeaBIOS:
    cloud-init ends, root grown, login works, nothing left running."""
    image = os.environ.get("KILN_TEST_IMAGE") or str(seed_build[0] / "debian-12-seed-example.qcow2")
    image_path = Path(image)
    mtime = image_path.stat().st_mtime_ns
    marker = f"kiln-{uuid.uuid4().hex[:12]}"
    user_data = boot_test_user_data(marker, root_password="Kiln-t3st")
    seed = make_nocloud_seed(tmp_path / "seed.iso", user_data=user_data, meta_data=boot_test_meta_data())
    accel = probe_accel(None)  # KILN_ACCEL or TCG: a slow test should not spend 15 s probing
    result = boot_test(image_path, firmware="bios", marker=marker, seed_iso=seed, workdir=tmp_path,
                       accel=accel, timeout=float(os.environ.get("KILN_TEST_BOOT_TIMEOUT", "900")),
                       extra_login=("root", "Kiln-t3st"))
    assert isinstance(result, BootResult) and result.passed
    assert result.firmware == "bios" and result.accel == accel
    assert result.login_ok is True
    assert result.root_bytes and result.disk_bytes and result.root_bytes <= result.disk_bytes
    virtual = int(qemu._image_info(image_path)[1])
    assert result.disk_bytes == virtual + qemu.DEFAULT_GROW_MIB * 1024 * 1024
    assert result.root_bytes > virtual * 0.8  # growroot used the extra space
    assert result.serial_log.is_file() and marker in result.serial_log.read_text(errors="replace")
    assert image_path.stat().st_mtime_ns == mtime
    assert qemu_pids_mentioning(str(tmp_path)) == []
    assert not list(tmp_path.glob(".boot-*"))


@pytest.mark.timeout(60)
def test_a_guest_flooding_its_console_is_failed_and_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15: what a guest prints is bounded in total, and a line that never ends is cut. The flooding
    guest is a stand-in socket here (a real one would need an image built to flood): the reader is kiln's."""
    monkeypatch.setattr(serial_console, "MAX_CONSOLE_BYTES", 4 * 1024 * 1024)
    killed = threading.Event()
    monkeypatch.setattr(serial_console.SerialConsole, "_signal", lambda self, sig: killed.set())
    sock = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock))
    server.listen(1)
    sent = [0]

    def flood() -> None:
        conn, _ = server.accept()
        with conn, server:
            chunk = b"A" * 65536  # no newline, ever
            with contextlib.suppress(OSError):
                while not killed.is_set() and sent[0] < 64 * 1024 * 1024:
                    conn.sendall(chunk)
                    sent[0] += len(chunk)

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    console = serial_console.SerialConsole(sock, "m", login=None, deadline=time.monotonic() + 50)
    console.start()
    console.join(timeout=40)
    assert not console.is_alive()
    facts = console.state.facts
    assert facts.fatal is not None and "flooded its serial console" in facts.fatal, facts.fatal
    assert killed.is_set()  # the guest was stopped
    assert sent[0] < 16 * 1024 * 1024  # not read for long after the bound
    assert len(console._partial) <= serial_console.MAX_LINE_CHARS
    thread.join(timeout=5)
