# shellcheck shell=bash
# shellcheck disable=SC2034  # its variables are used by the scripts and components that source it
# Shared by up.sh, down.sh and status.sh: where the stack lives, and how its daemons are started,
# recorded and stopped. Every component is a set of functions named after it:
#   <c>_requires    the components it needs running first
#   <c>_packages    pip requirements it adds to the shared venv
#   <c>_configure   write its config files (idempotent; returns 0 always)
#   <c>_prepare     one-time state: databases, keys (idempotent)
#   <c>_start       start its daemon(s) (only called when not healthy)
#   <c>_healthy     exit 0 when it answers
#   <c>_daemons     the daemon names it owns (pid files run/<name>.pid), in start order
# and, optionally:
#   <c>_debs        Debian packages it needs (installed with apt-get when missing)
#   <c>_before_stop called before its daemons are stopped (e.g. libvirt destroys its running guests)
#   <c>_after_stop  called after they stopped (e.g. guestnet removes its network namespace)
# A component file lives in components/<c>.sh and is listed in ALL_COMPONENTS below; register.py
# registers its service user and endpoints.

set -euo pipefail

KILN_OPENSTACK_DIR="${KILN_OPENSTACK_DIR:-/var/lib/kiln-openstack}"
KILN_OPENSTACK_PYTHON="${KILN_OPENSTACK_PYTHON:-python3}"
KILN_HOST=127.0.0.1
KILN_REGION="${KILN_REGION:-RegionOne}"
KILN_KEYSTONE_PORT="${KILN_KEYSTONE_PORT:-5000}"
KILN_GLANCE_PORT="${KILN_GLANCE_PORT:-9292}"
KILN_PLACEMENT_PORT="${KILN_PLACEMENT_PORT:-8778}"
KILN_NOVA_PORT="${KILN_NOVA_PORT:-8774}"
KILN_NEUTRON_PORT="${KILN_NEUTRON_PORT:-9696}"
KILN_RABBITMQ_PORT="${KILN_RABBITMQ_PORT:-5672}"
KILN_RABBITMQ_DIST_PORT="${KILN_RABBITMQ_DIST_PORT:-25672}"
KILN_EPMD_PORT="${KILN_EPMD_PORT:-14369}"   # a private epmd, not the host's shared one on 4369
# the guest network: a flat Neutron network whose taps live in a network namespace of their own
# (component guestnet); from the host a guest is reached only through that namespace
KILN_GUEST_NETWORK="${KILN_GUEST_NETWORK:-kiln-guests}"
KILN_GUEST_NETNS="${KILN_GUEST_NETNS:-kiln-guests}"
KILN_GUEST_CIDR="${KILN_GUEST_CIDR:-10.254.213.0/24}"
KILN_GUEST_GATEWAY="${KILN_GUEST_GATEWAY:-10.254.213.1}"
export KILN_GUEST_NETWORK KILN_GUEST_NETNS KILN_GUEST_CIDR KILN_GUEST_GATEWAY

INFRA_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$KILN_OPENSTACK_DIR/venv"
ETC="$KILN_OPENSTACK_DIR/etc"
DATA="$KILN_OPENSTACK_DIR/data"
RUN="$KILN_OPENSTACK_DIR/run"
LOGS="$KILN_OPENSTACK_DIR/logs"
SECRETS="$KILN_OPENSTACK_DIR/secrets.env"
CLOUDS_YAML="$KILN_OPENSTACK_DIR/clouds.yaml"

# every component this script knows, in start order (stop order is the reverse)
ALL_COMPONENTS=(keystone glance rabbitmq placement neutron guestnet libvirt nova)

say() { printf 'kiln-openstack: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

for _c in "${ALL_COMPONENTS[@]}"; do
    # shellcheck source=/dev/null
    source "$INFRA_DIR/components/$_c.sh"
done
unset _c

# component_requires NAME -> NAME's dependencies (transitively, from <c>_requires), then NAME itself
component_requires() {
    local c=$1 d
    declare -F "${c}_start" >/dev/null || die "unknown component '$c' (known: ${ALL_COMPONENTS[*]})"
    for d in $("${c}_requires"); do component_requires "$d"; done
    echo "$c"
}

# check_components NAME...: die (in this shell, not a subshell) on a name no component file defines
check_components() {
    local c
    for c in "$@"; do
        declare -F "${c}_start" >/dev/null || die "unknown component '$c' (known: ${ALL_COMPONENTS[*]})"
    done
}

# resolve_components [NAME...] -> the requested components with their dependencies, in start order
resolve_components() {
    local wanted=() c d
    for c in "$@"; do
        for d in $(component_requires "$c"); do wanted+=("$d"); done
    done
    for c in "${ALL_COMPONENTS[@]}"; do
        for d in "${wanted[@]}"; do
            if [[ $d == "$c" ]]; then echo "$c"; break; fi
        done
    done
}

ensure_dirs() {
    mkdir -p "$ETC" "$DATA" "$RUN" "$LOGS"
    chmod 700 "$KILN_OPENSTACK_DIR"
}

SECRET_NAMES=(ADMIN KILN GLANCE_SERVICE PLACEMENT_SERVICE NOVA_SERVICE NEUTRON_SERVICE RABBITMQ)

# Passwords are made once and kept in secrets.env (mode 600); never printed. A name this checkout
# added since the file was written is appended; existing ones never change.
load_secrets() {
    local name
    umask 077
    touch "$SECRETS"
    cp "$SECRETS" "$SECRETS.partial"
    for name in "${SECRET_NAMES[@]}"; do
        grep -q "^KILN_${name}_PASSWORD=" "$SECRETS" && continue
        printf 'KILN_%s_PASSWORD=%s\n' "$name" "$(head -c 24 /dev/urandom | base64 | tr -d '/+=' | head -c 24)" \
            >>"$SECRETS.partial"
    done
    mv "$SECRETS.partial" "$SECRETS"
    umask 022
    # shellcheck source=/dev/null
    source "$SECRETS"
    for name in "${SECRET_NAMES[@]}"; do export "KILN_${name}_PASSWORD"; done
}

# render TEMPLATE DEST: replace @NAME@ with the value of the shell variable NAME; write only if changed.
# Returns 0 when DEST changed, 1 when it was already up to date.
render() {
    local template=$1 dest=$2 tmp
    tmp="$(mktemp "$dest.XXXXXX")"
    "$VENV/bin/python" - "$template" "$tmp" <<'EOF'
import os, re, sys
text = open(sys.argv[1]).read()
def sub(m):
    name = m.group(1)
    if name not in os.environ:
        sys.exit(f"template {sys.argv[1]}: @{name}@ is not set")
    return os.environ[name]
open(sys.argv[2], "w").write(re.sub(r"@([A-Z0-9_]+)@", sub, text))
EOF
    chmod 600 "$tmp"
    if [[ -f $dest ]] && cmp -s "$tmp" "$dest"; then
        rm -f "$tmp"
        return 1
    fi
    mv "$tmp" "$dest"
    return 0
}

# alive PID: the process exists and is no zombie (PID 1 here does not reap the daemons it inherits)
alive() {
    local state
    state="$(cut -d')' -f2 "/proc/$1/stat" 2>/dev/null | cut -d' ' -f2)" || return 1
    [[ -n $state && $state != Z && $state != X ]]
}

pid_of() {  # pid_of DAEMON -> the recorded pid when that process still runs
    local file="$RUN/$1.pid" pid
    [[ -f $file ]] || return 1
    pid="$(tr -d '[:space:]' <"$file")"
    [[ -n $pid ]] && alive "$pid" || return 1
    echo "$pid"
}

# wait_http URL SECONDS: until URL answers with any HTTP status (the service is listening and serving)
wait_http() {
    local url=$1 seconds=$2
    "$VENV/bin/python" - "$url" "$seconds" <<'EOF'
import sys, time, urllib.error, urllib.request
url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while True:
    try:
        urllib.request.urlopen(url, timeout=5).close()
        sys.exit(0)
    except urllib.error.HTTPError:
        sys.exit(0)
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.3)
EOF
}

port_busy() {  # port_busy PORT: something listens on 127.0.0.1:PORT
    (exec 3<>"/dev/tcp/$KILN_HOST/$1") 2>/dev/null
}

# start_uwsgi NAME INI: start a uWSGI master that daemonizes itself, logs to logs/NAME.log and
# records its pid in run/NAME.pid.
start_uwsgi() {
    local name=$1 ini=$2
    rm -f "$RUN/$name.pid"
    # 9>&-: the daemon must not inherit up.sh's lock
    "$VENV/bin/uwsgi" --ini "$ini" >>"$LOGS/$name.log" 2>&1 </dev/null 9>&- \
        || die "$name: uWSGI did not start; see $LOGS/$name.log"
    local i
    for i in $(seq 1 50); do
        pid_of "$name" >/dev/null && return 0
        sleep 0.1
    done
    die "$name: no pid file after start; see $LOGS/$name.log"
}

# stop_daemon NAME [GRACE]: SIGTERM the recorded process and its children, SIGKILL what is left
stop_daemon() {
    local name=$1 grace=${2:-15} pid kids i t0=$SECONDS
    pid="$(pid_of "$name")" || { rm -f "$RUN/$name.pid"; return 0; }
    kids="$(pgrep -P "$pid" || true)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 $((grace * 10))); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        say "$name (pid $pid) did not stop in ${grace}s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    for i in $kids; do kill -KILL "$i" 2>/dev/null || true; done
    rm -f "$RUN/$name.pid"
    say "stopped $name ($((SECONDS - t0)) s)"
}

# the pinned requirements of the venv for a set of components (one line each, sorted)
requirements_for() {
    local c
    {
        echo "uwsgi==2.0.31"
        echo "openstacksdk==4.22.0"
        echo "python-openstackclient==10.5.0"
        for c in "$@"; do "${c}_packages"; done
    } | sort -u
}

# install_venv COMPONENT...: one pip run for everything, skipped when the venv already holds these pins
# (the stamp records the constraints' hash and every requirement installed so far, so `up.sh` after
# `up.sh nova` installs nothing)
install_venv() {
    local req="$KILN_OPENSTACK_DIR/requirements.txt" stamp="$VENV/.kiln-installed" cons have
    requirements_for "$@" >"$req"
    cons="constraints $(sha256sum <"$INFRA_DIR/constraints.txt" | cut -d' ' -f1)"
    if [[ -x $VENV/bin/python && -f $stamp ]] && [[ "$(head -n 1 "$stamp")" == "$cons" ]] \
        && ! grep -vxF -f <(tail -n +2 "$stamp") "$req" >/dev/null; then
        return 0
    fi
    have=""
    if [[ -f $stamp ]] && [[ "$(head -n 1 "$stamp")" == "$cons" ]]; then have="$(tail -n +2 "$stamp")"; fi
    local start=$SECONDS
    say "installing $(tr '\n' ' ' <"$req")into $VENV (a few minutes the first time)"
    [[ -x $VENV/bin/python ]] || "$KILN_OPENSTACK_PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >>"$LOGS/install.log" 2>&1
    "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off \
        -c "$INFRA_DIR/constraints.txt" -r "$req" >>"$LOGS/install.log" 2>&1 \
        || die "pip install failed; see $LOGS/install.log"
    { echo "$cons"; { [[ -z $have ]] || echo "$have"; cat "$req"; } | sort -u; } >"$stamp"
    say "installed in $((SECONDS - start)) s"
}

# start_daemon NAME COMMAND...: run a foreground daemon in a session of its own (so that nothing that
# kills up.sh's process group reaches it), output to logs/NAME.log, pid in run/NAME.pid.
start_daemon() {
    local name=$1
    shift
    rm -f "$RUN/$name.pid"
    # 9>&-: the daemon must not inherit up.sh's lock. A background job of a non-interactive shell is no
    # process group leader, so setsid needs no fork and $! is the daemon itself.
    setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null 9>&- &
    echo $! >"$RUN/$name.pid"
    sleep 0.2
    pid_of "$name" >/dev/null || die "$name exited at once; see $LOGS/$name.log"
}

# wait_healthy COMPONENT DAEMON SECONDS: until COMPONENT_healthy answers (0), or DAEMON died or the time ran out (1)
wait_healthy() {
    local c=$1 daemon=$2 seconds=$3 _
    for _ in $(seq 1 $((seconds * 5))); do
        "${c}_healthy" && return 0
        pid_of "$daemon" >/dev/null || return 1
        sleep 0.2
    done
    return 1
}

# wait_port PORT SECONDS [DAEMON]: until something listens on 127.0.0.1:PORT (fail early when DAEMON died)
wait_port() {
    local port=$1 seconds=$2 daemon=${3:-} i
    for i in $(seq 1 $((seconds * 5))); do
        port_busy "$port" && return 0
        if [[ -n $daemon ]] && ! pid_of "$daemon" >/dev/null; then return 1; fi
        sleep 0.2
    done
    return 1
}

# stop_component NAME: its own pre-stop step, then its daemons, newest first
stop_component() {
    local c=$1 d daemons=()
    if declare -F "${c}_before_stop" >/dev/null; then "${c}_before_stop" || true; fi
    read -r -a daemons <<<"$("${c}_daemons")"
    for ((d = ${#daemons[@]} - 1; d >= 0; d--)); do stop_daemon "${daemons[$d]}"; done
    if declare -F "${c}_after_stop" >/dev/null; then "${c}_after_stop" || true; fi
}

# install_debs COMPONENT...: the Debian packages the components need, when any is missing. Package
# scripts must not start the host's own services (rabbitmq-server's would): a policy-rc.d forbids it
# for the duration unless the host already has one.
install_debs() {
    local c pkgs=() missing=() p policy=/usr/sbin/policy-rc.d made_policy=false
    for c in "$@"; do
        if declare -F "${c}_debs" >/dev/null; then
            read -r -a p <<<"$("${c}_debs")"
            pkgs+=("${p[@]}")
        fi
    done
    [[ ${#pkgs[@]} -gt 0 ]] || return 0
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [[ ${#missing[@]} -gt 0 ]] || return 0
    local start=$SECONDS
    say "installing Debian packages: ${missing[*]}"
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        made_policy=true
    fi
    local rc=0
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}"; } >>"$LOGS/install.log" 2>&1 || rc=$?
    if $made_policy; then rm -f "$policy"; fi
    [[ $rc -eq 0 ]] || die "apt-get install ${missing[*]} failed; see $LOGS/install.log"
    say "installed Debian packages in $((SECONDS - start)) s"
}
