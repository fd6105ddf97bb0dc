# shellcheck shell=bash
# Placement 16 as placement.wsgi.api:application under uWSGI on 127.0.0.1: SQLite, Keystone auth.

placement_requires() { echo keystone; }

placement_packages() { echo "openstack-placement==16.0.0"; }

placement_daemons() { echo placement; }

placement_url() { echo "http://$KILN_HOST:$KILN_PLACEMENT_PORT"; }

placement_configure() {
    mkdir -p "$ETC/placement" "$DATA/placement"
    export KILN_OPENSTACK_DIR KILN_HOST KILN_KEYSTONE_PORT KILN_PLACEMENT_PORT VENV ETC DATA RUN LOGS
    export KILN_PLACEMENT_SERVICE_PASSWORD
    local changed=1
    render "$INFRA_DIR/templates/placement.conf" "$ETC/placement/placement.conf" && changed=0
    render "$INFRA_DIR/templates/placement-uwsgi.ini" "$ETC/placement/uwsgi.ini" && changed=0
    return $changed
}

placement_prepare() {
    if [[ ! -f $DATA/placement/.prepared ]]; then
        "$VENV/bin/placement-manage" --config-dir "$ETC/placement" db sync >>"$LOGS/placement-manage.log" 2>&1 \
            || die "placement-manage db sync failed; see $LOGS/placement-manage.log"
        touch "$DATA/placement/.prepared"
    fi
}

placement_start() {
    port_busy "$KILN_PLACEMENT_PORT" && die "placement: port $KILN_PLACEMENT_PORT on $KILN_HOST is taken by another process"
    start_uwsgi placement "$ETC/placement/uwsgi.ini"
    wait_http "$(placement_url)/" 90 || die "placement did not answer within 90 s; see $LOGS/placement.log"
}

placement_healthy() {
    pid_of placement >/dev/null && wait_http "$(placement_url)/" 2
}
