# shellcheck shell=bash
# Debian's libvirtd and virtlogd (QEMU in TCG mode), each in a private mount namespace in which
# /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt are directories
# under KILN_OPENSTACK_DIR: the host's /etc is never changed and a host libvirtd is never disturbed.
# Its qemu.conf runs QEMU as root (else libvirtd re-probes QEMU on every call here, ~48 s a boot, because
# /dev/kvm belongs to a group other than kvm). nova-compute reaches it through the socket's real path.

libvirt_requires() { :; }

# libvirt-python builds against libvirt-dev; genisoimage makes Nova's config drives
libvirt_packages() { echo "libvirt-python==9.0.0"; }

libvirt_debs() {
    echo libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config \
        qemu-system-x86 qemu-utils genisoimage ovmf
}

libvirt_daemons() { echo virtlogd libvirtd; }

libvirt_socket() { echo "$RUN/libvirt/libvirt-sock"; }

libvirt_uri() { echo "qemu:///system?socket=$(libvirt_socket)"; }

libvirt_configure() {
    mkdir -p "$ETC/libvirt/qemu" "$ETC/libvirt/nwfilter" "$RUN/libvirt" "$DATA/libvirt/lib" \
        "$DATA/libvirt/cache" "$LOGS/libvirt"
    export LOGS RUN
    local changed=1
    render "$INFRA_DIR/templates/libvirtd.conf" "$ETC/libvirt/libvirtd.conf" && changed=0
    render "$INFRA_DIR/templates/libvirt-qemu.conf" "$ETC/libvirt/qemu.conf" && changed=0
    render "$INFRA_DIR/templates/virtlogd.conf" "$ETC/libvirt/virtlogd.conf" && changed=0
    return $changed
}

# What libvirt-daemon-system would create and kiln does not install (its scripts set up a host libvirtd):
# the mount points kiln's directories are bound over, and the QEMU user libvirtd resolves when its QEMU
# driver loads, before it reads qemu.conf ("Failed to parse user 'libvirt-qemu'" without it).
libvirt_prepare() {
    mkdir -p /etc/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt
    getent group kvm >/dev/null || groupadd --system kvm
    getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
    getent passwd libvirt-qemu >/dev/null \
        || useradd --system --gid kvm --groups libvirt-qemu --home-dir /var/lib/libvirt \
            --no-create-home --shell /usr/sbin/nologin libvirt-qemu
}

# libvirt_ns_start NAME COMMAND...: COMMAND in a new mount namespace with kiln's libvirt directories
# bound over the host's
libvirt_ns_start() {
    local name=$1
    shift
    local binds="set -e
        mkdir -p /run/libvirt
        mount --bind '$ETC/libvirt' /etc/libvirt
        mount --bind '$RUN/libvirt' /run/libvirt
        mount --bind '$DATA/libvirt/lib' /var/lib/libvirt
        mount --bind '$DATA/libvirt/cache' /var/cache/libvirt
        mount --bind '$LOGS/libvirt' /var/log/libvirt
        exec \"\$@\""
    start_daemon "$name" unshare --mount --propagation private -- bash -c "$binds" "$name" "$@"
}

libvirt_start() {
    [[ -d /etc/libvirt && -d /var/lib/libvirt && -d /var/cache/libvirt && -d /var/log/libvirt ]] \
        || die "libvirt: /etc/libvirt, /var/lib/libvirt, /var/cache/libvirt or /var/log/libvirt is missing (libvirt_prepare makes them)"
    rm -f "$RUN/libvirt/virtlogd-sock" "$RUN/libvirt/virtlogd-admin-sock" "$(libvirt_socket)"
    libvirt_ns_start virtlogd /usr/sbin/virtlogd --config /etc/libvirt/virtlogd.conf \
        --pid-file /run/libvirt/virtlogd.pid

    for _ in $(seq 1 50); do [[ -S $RUN/libvirt/virtlogd-sock ]] && break; sleep 0.2; done
    [[ -S $RUN/libvirt/virtlogd-sock ]] || die "virtlogd did not start; see $LOGS/virtlogd.log"
    libvirt_ns_start libvirtd /usr/sbin/libvirtd --config /etc/libvirt/libvirtd.conf \
        --pid-file /run/libvirt/libvirtd.pid
    wait_healthy libvirt libvirtd 30 || die "libvirtd did not answer within 30 s; see $LOGS/libvirtd.log"
}

libvirt_healthy() {
    pid_of virtlogd >/dev/null && pid_of libvirtd >/dev/null \
        && timeout 10 virsh -q -c "$(libvirt_uri)" version >/dev/null 2>&1
}

# every guest QEMU this libvirtd started: the domains' pid files under its private /run/libvirt/qemu
# (driver.pid there is libvirtd's own), checked to still be a QEMU
libvirt_guest_pids() {
    local f pid
    for f in "$RUN"/libvirt/qemu/*.pid; do
        [[ -e $f && $(basename "$f") != driver.pid ]] || continue
        pid="$(tr -d '[:space:]' <"$f")"
        [[ -n $pid ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == qemu* ]] && echo "$pid"
    done
    return 0
}

# nothing may outlive the stack: destroy running guests (QEMU runs on after libvirtd stops), then kill
# any whose libvirtd was already gone
libvirt_before_stop() {
    local dom pid
    if pid_of libvirtd >/dev/null; then
        for dom in $(timeout 20 virsh -q -c "$(libvirt_uri)" list --name 2>/dev/null); do
            say "libvirt: destroying guest $dom"
            timeout 30 virsh -q -c "$(libvirt_uri)" destroy "$dom" >/dev/null 2>&1 || true
        done
    fi
    for pid in $(libvirt_guest_pids); do
        say "libvirt: killing guest QEMU $pid"
        kill -KILL "$pid" 2>/dev/null || true
    done
}
