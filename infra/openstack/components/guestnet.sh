# shellcheck shell=bash
# The guest network's data plane (guestnet.py): Neutron's flat network KILN_GUEST_NETWORK, whose ports
# the kiln_tap ML2 driver binds as tap devices, lives in the network namespace KILN_GUEST_NETNS with the
# gateway address KILN_GUEST_GATEWAY on a bridge. The daemon moves each guest's tap there once QEMU
# holds it, as an isolated bridge port: a guest reaches that address only, nothing of the host's and no
# other guest; the host reaches the guests only from inside the namespace (kiln's Nova boot test logs in
# over SSH from there). Until a tap is moved, the host's nftables tables `kiln_guests` drop everything
# from and to tap* devices. register.py makes the
# network and its subnet (no DHCP: Nova's config drive carries the address, cloud-init sets it).

guestnet_requires() { echo keystone neutron; }

guestnet_packages() { :; }

guestnet_debs() { echo iproute2 nftables; }

guestnet_daemons() { echo guestnet; }

guestnet_configure() { return 1; }

guestnet_prepare() { :; }

guestnet_start() {
    export KILN_NEUTRON_SERVICE_PASSWORD KILN_REGION
    KILN_KEYSTONE_URL="http://$KILN_HOST:$KILN_KEYSTONE_PORT/v3" \
        start_daemon guestnet "$VENV/bin/python" "$INFRA_DIR/guestnet.py" --netns "$KILN_GUEST_NETNS" \
        --gateway "$KILN_GUEST_GATEWAY/${KILN_GUEST_CIDR#*/}" --physnet "$KILN_GUEST_NETWORK"
    wait_healthy guestnet guestnet 10 \
        || die "guestnet did not make its namespace $KILN_GUEST_NETNS; see $LOGS/guestnet.log"
}

guestnet_healthy() {
    pid_of guestnet >/dev/null && ip netns list 2>/dev/null | grep -qw "^$KILN_GUEST_NETNS" \
        && nft list table inet kiln_guests >/dev/null 2>&1
}

# the namespace and the host's tap* rules go with the daemon (libvirt, stopped before it, has destroyed
# the guests by then)
guestnet_after_stop() {
    if ip netns list 2>/dev/null | grep -qw "^$KILN_GUEST_NETNS"; then
        ip netns delete "$KILN_GUEST_NETNS" && say "removed network namespace $KILN_GUEST_NETNS"
    fi
    local family
    for family in inet arp; do
        if nft list table "$family" kiln_guests >/dev/null 2>&1; then
            nft delete table "$family" kiln_guests && say "removed nftables table $family kiln_guests"
        fi
    done
}
