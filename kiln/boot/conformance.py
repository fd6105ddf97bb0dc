"""The conformance suite: what a booted image must be, checked inside the guest at every boot test.

The suite is a shell script the boot test's user-data installs as a cloud-init per-boot script, so it
runs at the first boot and again after a reboot (QEMU and Nova alike). Detached from cloud-final, it
waits for cloud-init and systemd to settle, runs every check and prints one line per check on the
serial console (`KILN-CHECK boot=N name=… result=pass|fail|skip detail=<base64>`) and a closing
`KILN-CHECKS-END boot=N count=M`. Two checks are made from the host: the root file system's growth
(the sizes the boot test prints) and the guest agent (a `guest-ping` on its virtio channel, QEMU only).

Elements add checks: executables in an element's `checks.d/` (DIB-style names), carried to the guest in
the user-data and run after the built-in ones; a spec waives a check with a reason (`boot_test.waive`):
it still runs and is recorded, as `waived`, and does not fail the build.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.build.elements import ElementCheck
from kiln.build.plan import BuildPlan
from kiln.host.run import redact
from kiln.model import facts
from kiln.model.checks import BUILTIN, HOST_CHECKS, RESULTS, CheckOutcome
from kiln.model.errors import BootTestError
from kiln.model.record import BuildRecord
from kiln.model.spec import ImageSpec

log = logging.getLogger("kiln.conformance")

SUITE_VERSION = "1"
CHECK_PREFIX = "KILN-CHECK "
END_PREFIX = "KILN-CHECKS-END "
REBOOT_LINE = "KILN-CHECKS-REBOOT"
SECURE_BOOT_VAR = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"
CONTROL_PORT = "org.kiln.control.0"  # the virtio-serial port the host tells the guest to reboot through
GUEST_DIR = "/var/lib/kiln-conformance"
PER_BOOT_SCRIPT = "/var/lib/cloud/scripts/per-boot/kiln-conformance"
DETAIL_BYTES = 400

FIRST_BOOT_ONLY = ("host-keys-fresh", "machine-id-fresh", "no-leftovers")
GROWN_SLACK = 512 * 1024 * 1024  # the ESP, the BIOS boot partition and file system overhead

_LINE_RE = re.compile(r"KILN-CHECK boot=(\d) name=([A-Za-z0-9_.:/-]{1,120}) result=(pass|fail|skip) "
                      r"detail=([A-Za-z0-9+/=]{0,800})")
_END_RE = re.compile(r"KILN-CHECKS-END boot=(\d) count=(\d{1,4})")


@dataclass(frozen=True)
class Suite:
    """What the suite expects of one image, and how it runs."""

    arch: str
    security_suite: str | None = None  # the suite the apt sources must name; None: no such check
    root_login: bool = False  # the boot test sets root's password and turns on password logins
    guest_agent: bool = False  # qemu-guest-agent is installed
    cloud_init: bool = True  # without cloud-init nothing reads the user-data: no suite runs
    reboot: bool = True  # boot a second time and run the suite again
    element_checks: tuple[ElementCheck, ...] = ()
    waive: tuple[tuple[str, str], ...] = ()  # (check, reason)

    @property
    def names(self) -> list[str]:
        return [*BUILTIN, *(c.name for c in self.element_checks)]

    @property
    def boots(self) -> int:
        return 2 if self.reboot else 1

    def key(self) -> dict[str, Any]:
        """What a cached boot result depends on, besides the image."""
        return {"suite": SUITE_VERSION, "security": self.security_suite, "agent": self.guest_agent,
                "reboot": self.reboot, "waive": [list(w) for w in self.waive],
                "checks": {c.name: hashlib.sha256(c.content).hexdigest() for c in self.element_checks}}


# ------------------------------------------------------------------------------------------ guest script


def guest_script(suite: Suite, firmware: str) -> str:
    """The per-boot script (POSIX sh) that runs the suite in the guest."""
    console = "/dev/" + facts.serial_console_of(suite.arch)
    lines = [
        "#!/bin/sh",
        "# kiln's conformance suite: run by cloud-init at every boot, results on the serial console",
        "set -u",
        f"dir={GUEST_DIR}",
        'if [ "${KILN_CONFORMANCE_DETACHED:-}" != 1 ]; then',
        "  # cloud-final runs this; the suite waits for cloud-init's end, so it runs apart from it",
        '  exec systemd-run --no-block --quiet --unit="kiln-conformance-$(date +%s)" '
        '--setenv=KILN_CONFORMANCE_DETACHED=1 /bin/sh "$0"',
        "fi",
        f"out={console}",
        "n=0",
        'mkdir -p "$dir"',
        'boot=$(( $(cat "$dir/boots" 2>/dev/null || echo 0) + 1 ))',
        'echo "$boot" > "$dir/boots"',
        "report() {",
        '  d=$(printf %s "$3" | head -c ' + str(DETAIL_BYTES) + " | base64 -w0)",
        "  printf 'KILN-CHECK boot=%s name=%s result=%s detail=%s\\n' \"$boot\" \"$1\" \"$2\" \"$d\" > \"$out\"",
        "  n=$((n+1))",
        "}",
        "cloud-init status --wait >/dev/null 2>&1",
        "systemctl is-system-running --wait >/dev/null 2>&1",
        "btime=$(awk '/^btime/ {print $2}' /proc/stat)",
        # cloud-init
        "st=$(cloud-init status 2>&1 | grep -m1 '^status:')",
        "errs=$(grep -E '\\[(ERROR|CRITICAL)\\]|Traceback' /var/log/cloud-init.log 2>/dev/null | head -n 3)",
        'if [ "$st" = "status: done" ] && [ -z "$errs" ]; then report cloud-init pass "$st"; '
        'else report cloud-init fail "$st${errs:+; }$errs"; fi',
        # failed units
        "failed=$(systemctl list-units --state=failed --no-legend --plain 2>/dev/null | awk '{print $1}' "
        "| paste -sd' ' -)",
        'if [ -z "$failed" ]; then report failed-units pass ""; else report failed-units fail "$failed"; fi',
        # root's password and sshd
        f"root_login={1 if suite.root_login else 0}",
        'if [ "$root_login" = 1 ]; then report root-locked skip "the boot test set root\'s password"; else',
        "  pw=$(passwd -S root 2>&1 | awk '{print $2}')",
        '  case "$pw" in L|LK) report root-locked pass "passwd -S: $pw" ;; '
        '*) report root-locked fail "passwd -S root: $pw (not locked)" ;; esac',
        "fi",
        "if ! command -v sshd >/dev/null 2>&1 && [ ! -x /usr/sbin/sshd ]; then",
        '  report sshd-no-passwords skip "no sshd"; report host-keys-fresh skip "no sshd"',
        "else",
        '  if [ "$root_login" = 1 ]; then report sshd-no-passwords skip "the boot test asked for password logins"',
        "  else",
        "    eff=$(/usr/sbin/sshd -T 2>&1 | awk 'tolower($1)==\"passwordauthentication\" || "
        "tolower($1)==\"kbdinteractiveauthentication\" {print tolower($1)\"=\"$2}' | sort | paste -sd' ' -)",
        '    case "$eff" in',
        '      "kbdinteractiveauthentication=no passwordauthentication=no") report sshd-no-passwords pass "$eff" ;;',
        '      *) report sshd-no-passwords fail "sshd -T: ${eff:-nothing}" ;;',
        "    esac",
        "  fi",
        '  if [ "$boot" = 1 ]; then',
        "    keys=$(ls /etc/ssh/ssh_host_*_key 2>/dev/null | paste -sd' ' -)",
        "    old=$(find /etc/ssh -maxdepth 1 -name 'ssh_host_*_key' ! -newermt \"@$btime\" 2>/dev/null "
        "| paste -sd' ' -)",
        "    baked=$(grep -m1 -o 'Attempting to remove /etc/ssh/ssh_host_[^ ]*' /var/log/cloud-init.log 2>/dev/null)",
        '    if [ -z "$keys" ]; then report host-keys-fresh fail "no host key in /etc/ssh"',
        '    elif [ -n "$old" ]; then report host-keys-fresh fail "older than this boot: $old"',
        '    elif [ -n "$baked" ]; then report host-keys-fresh fail "the image carried host keys (cloud-init: $baked)"',
        '    else report host-keys-fresh pass "$keys"; fi',
        '  else report host-keys-fresh skip "first boot only"; fi',
        "fi",
        # first-boot facts of the image itself
        'if [ "$boot" = 1 ]; then',
        "  mid=$(cat /etc/machine-id 2>/dev/null)",
        "  if ! printf %s \"$mid\" | grep -Eq '^[0-9a-f]{32}$'; then report machine-id-fresh fail "
        '"/etc/machine-id holds ${mid:-nothing}"',
        "  elif [ -z \"$(find /etc/machine-id -newermt \"@$btime\" 2>/dev/null)\" ]; then "
        'report machine-id-fresh fail "/etc/machine-id is older than this boot: baked into the image"',
        '  else report machine-id-fresh pass ""; fi',
        "  left=$( { find /root /home -maxdepth 2 \\( -name .bash_history -o -name .history -o -name .sh_history "
        "-o -name .python_history -o -name .lesshst -o -name .viminfo \\) ! -newermt \"@$btime\" 2>/dev/null;"
        " find /tmp /var/tmp -xdev -mindepth 1 ! -newermt \"@$btime\" 2>/dev/null;"
        " find /var/lib/apt/lists -maxdepth 1 -type f ! -name lock ! -newermt \"@$btime\" 2>/dev/null; }"
        " | head -n 8 | paste -sd' ' -)",
        '  if [ -z "$left" ]; then report no-leftovers pass ""; else report no-leftovers fail "$left"; fi',
        "else",
        '  for c in machine-id-fresh no-leftovers; do report "$c" skip "first boot only"; done',
        "fi",
        # apt sources, console, time
        f"security={suite.security_suite or ''}",
        'if [ -z "$security" ]; then report security-suite skip "the image\'s packages came from no security suite"',
        "elif cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources "
        "2>/dev/null | grep -v '^[[:space:]]*#' | grep -qw -- \"$security\"; then "
        'report security-suite pass "$security"',
        'else report security-suite fail "no apt source names $security"; fi',
        f"serial={facts.serial_console_of(suite.arch)}",
        "if tr ' ' '\\n' < /proc/cmdline | grep -Eq \"^console=$serial(,|$)\"; then "
        'report serial-console pass "console=$serial"',
        'else report serial-console fail "$(cat /proc/cmdline)"; fi',
        "sync=''",
        "for u in systemd-timesyncd chrony chronyd ntpsec ntp openntpd; do",
        '  if systemctl is-active --quiet "$u" 2>/dev/null; then sync=$u; break; fi',
        "done",
        'if [ -n "$sync" ]; then report time-sync pass "$sync"; else report time-sync fail "none running"; fi',
        "button=''",
        "for u in systemd-logind acpid; do",
        '  if systemctl is-active --quiet "$u" 2>/dev/null; then button=$u; break; fi',
        "done",
        'if [ -n "$button" ]; then report power-button pass "$button"; '
        'else report power-button fail "neither systemd-logind nor acpid is running"; fi',
        f"firmware={firmware}",
        'if [ "$firmware" != uefi-secureboot ]; then report secure-boot skip "booted with $firmware"',
        f"else sb=$(od -An -t u1 {SECURE_BOOT_VAR} 2>/dev/null | awk '{{print $NF}}')",
        '  if [ "$sb" = 1 ]; then report secure-boot pass "SecureBoot=1"; '
        'else report secure-boot fail "SecureBoot=${sb:-absent}"; fi',
        "fi",
        # the elements' own checks
        'for f in "$dir"/checks.d/*; do',
        '  [ -x "$f" ] || continue',
        '  name=$(basename "$f" | tr : /)',
        '  o=$(timeout 300 "$f" 2>&1); rc=$?',
        '  if [ "$rc" = 0 ]; then report "$name" pass "$(printf %s "$o" | tail -c 200)"; '
        'else report "$name" fail "exit $rc: $(printf %s "$o" | tail -c 300)"; fi',
        "done",
        "printf 'KILN-CHECKS-END boot=%s count=%s\\n' \"$boot\" \"$n\" > \"$out\"",
        # the host says when it is done with this boot (logins, the agent): then the guest reboots
        f'port=/dev/virtio-ports/{CONTROL_PORT}',
        'if [ "$boot" = 1 ] && [ -c "$port" ]; then',
        "  # a read returns at once while the host's end is not connected: ask again, for half an hour at most",
        "  i=0",
        '  while [ "$i" -lt 600 ]; do',
        '    cmd=$(timeout 60 head -n 1 "$port" 2>/dev/null)',
        f'    if [ "$cmd" = reboot ]; then echo {REBOOT_LINE} > "$out"; systemctl reboot; break; fi',
        "    sleep 3; i=$((i+1))",
        "  done",
        "fi",
    ]
    return "\n".join(lines) + "\n"


def _names(packages: Sequence[Mapping[str, Any]]) -> set[str]:
    return {str(p.get("name")) for p in packages}


def suite_for(plan: BuildPlan, packages: Sequence[Mapping[str, Any]]) -> Suite:
    """The suite of the image a plan built, whose package list is `packages`."""
    spec = plan.spec
    installed = _names(packages)
    security = next((s.name for s in plan.suites if facts.is_security_suite(s.name)), None)
    return Suite(arch=spec.arch.value, security_suite=security, root_login=spec.boot_test.root_login,
                 guest_agent="qemu-guest-agent" in installed, cloud_init="cloud-init" in installed or not packages,
                 reboot=spec.boot_test.reboot, element_checks=plan.checks,
                 waive=tuple(sorted(spec.boot_test.waive.items())))


def suite_of_record(spec: ImageSpec, base: Mapping[str, Any], packages: Sequence[Mapping[str, Any]]) -> Suite:
    """The suite of a finished build read from its output directory: the built-in checks only (the elements'
    checks are read from element directories, which a stranger's manifest must not name)."""
    installed = _names(packages)
    suites = base.get("suites") if base.get("kind") == "bootstrap" else None
    names = [str(s.get("name")) for s in suites if isinstance(s, dict)] if isinstance(suites, list) else []
    security = next((n for n in names if facts.is_security_suite(n)), None)
    waive = {k: v for k, v in spec.boot_test.waive.items() if k in BUILTIN}
    return Suite(arch=spec.arch.value, security_suite=security, root_login=spec.boot_test.root_login,
                 guest_agent="qemu-guest-agent" in installed, cloud_init="cloud-init" in installed or not packages,
                 reboot=spec.boot_test.reboot, waive=tuple(sorted(waive.items())))


def spec_of_build(build: BuildRecord) -> ImageSpec:
    """The image spec a finished build recorded (its secrets were never recorded)."""
    data = dict(build.spec)
    data.pop("secrets", None)
    return ImageSpec.model_validate(data)


def suite_of_build(build: BuildRecord) -> Suite:
    return suite_of_record(spec_of_build(build), build.base, build.packages)


def write_files(suite: Suite, firmware: str) -> list[dict[str, Any]]:
    """cloud-config `write_files` entries: the per-boot script and the elements' checks."""
    files: list[dict[str, Any]] = [{"path": PER_BOOT_SCRIPT, "permissions": "0755", "owner": "root:root",
                                    "encoding": "b64",
                                    "content": base64.b64encode(guest_script(suite, firmware).encode()).decode()}]
    for check in suite.element_checks:
        files.append({"path": f"{GUEST_DIR}/checks.d/{check.element}:{check.file}", "permissions": "0755",
                      "owner": "root:root", "encoding": "b64",
                      "content": base64.b64encode(check.content).decode()})
    return files


# ---------------------------------------------------------------------------------------- the verdict


@dataclass
class Reports:
    """The suite's lines as the console shows them, fed one cleaned line at a time."""

    checks: list[CheckOutcome] = field(default_factory=list)
    ends: dict[int, int] = field(default_factory=dict)  # boot -> count the guest said it reported

    def feed(self, line: str) -> None:
        if m := _LINE_RE.search(line):
            try:
                detail = base64.b64decode(m.group(4), validate=True).decode("utf-8", errors="replace")
            except (binascii.Error, ValueError):
                detail = "(unreadable detail)"
            boot, name = int(m.group(1)), m.group(2)
            if not any(c.boot == boot and c.name == name for c in self.checks):
                self.checks.append(CheckOutcome(name=name, boot=boot, result=m.group(3),
                                                detail=_printable(redact(detail))))
        elif m := _END_RE.search(line):
            self.ends.setdefault(int(m.group(1)), int(m.group(2)))

    def done(self, boot: int) -> bool:
        return boot in self.ends

    def of_boot(self, boot: int) -> list[CheckOutcome]:
        return [c for c in self.checks if c.boot == boot]


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else " " for ch in text).strip()[:DETAIL_BYTES]


def host_checks(suite: Suite, *, root_bytes: int | None, disk_bytes: int | None,
                agent: str | None) -> list[CheckOutcome]:
    """The checks made from the host, for the first boot. `agent`: the guest-ping's verdict, None when not
    asked (Nova), else "" for an answer or what went wrong."""
    out = []
    if root_bytes is None or disk_bytes is None:
        out.append(CheckOutcome("root-grown", 1, "fail", "the guest reported no root or disk size"))
    elif root_bytes + GROWN_SLACK >= disk_bytes:
        out.append(CheckOutcome("root-grown", 1, "pass", f"root {root_bytes} bytes on a {disk_bytes}-byte disk"))
    else:
        out.append(CheckOutcome("root-grown", 1, "fail", f"root {root_bytes} bytes on a {disk_bytes}-byte disk"))
    if not suite.guest_agent:
        out.append(CheckOutcome("guest-agent", 1, "skip", "qemu-guest-agent is not installed"))
    elif agent is None:
        out.append(CheckOutcome("guest-agent", 1, "skip", "the agent's channel is not reachable from kiln here"))
    else:
        out.append(CheckOutcome("guest-agent", 1, "fail" if agent else "pass", agent or "guest-ping answered"))
    return out


def verdict(suite: Suite, reports: Reports, host: Sequence[CheckOutcome], *, boots: int,
            fatal: str | None = None) -> list[CheckOutcome]:
    """Every check of every boot, waivers applied, with a `fail` for a check the guest never reported.

    Raises nothing: `failures` says what fails the build."""
    waived = dict(suite.waive)
    outcomes: list[CheckOutcome] = []
    for boot in range(1, boots + 1):
        seen = {c.name: c for c in reports.of_boot(boot)}
        if boot == 1:
            seen.update({c.name: c for c in host})
        for name in suite.names:
            check = seen.pop(name, None)
            if check is None:
                if boot > 1 and name in HOST_CHECKS:
                    continue
                what = ("not reported" if boot in reports.ends else
                        f"the suite did not report at boot {boot}" + (f": {fatal}" if fatal else ""))
                check = CheckOutcome(name, boot, "fail", what)
            outcomes.append(check)
        for extra in seen.values():  # a name the host did not ask for: recorded, never a pass
            outcomes.append(CheckOutcome(extra.name, boot, "fail", f"unexpected check: {extra.detail}"))
    return [CheckOutcome(c.name, c.boot, "waived", f"{c.detail} (waived: {waived[c.name]})")
            if c.result == "fail" and c.name in waived else c for c in outcomes]


def failures(outcomes: Sequence[CheckOutcome]) -> list[CheckOutcome]:
    return [c for c in outcomes if c.result == "fail"]


def raise_on_failures(outcomes: Sequence[CheckOutcome], *, where: str, serial_log: Path | str) -> None:
    """BootTestError naming every failed check and what it saw."""
    failed = failures(outcomes)
    if not failed:
        return
    listed = "; ".join(f"{c.name} (boot {c.boot}): {c.detail or 'failed'}" for c in failed)
    raise BootTestError(f"{where}: conformance check{'s' if len(failed) > 1 else ''} failed: {listed}; "
                        f"waive a check in boot_test.waive with a reason if the image is meant so; console log: "
                        f"{serial_log}")


def summary(outcomes: Sequence[CheckOutcome]) -> str:
    counts = {r: sum(1 for c in outcomes if c.result == r) for r in RESULTS}
    return ", ".join(f"{n} {r}" for r, n in counts.items() if n)


