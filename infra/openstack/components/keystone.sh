# shellcheck shell=bash
# Keystone 30 under uWSGI on 127.0.0.1: SQLite, fernet tokens, bootstrap admin, identity endpoints.

keystone_requires() { :; }

keystone_packages() { echo "keystone==30.0.0"; }

keystone_daemons() { echo keystone; }

keystone_url() { echo "http://$KILN_HOST:$KILN_KEYSTONE_PORT"; }

keystone_manage() {
    OS_KEYSTONE_CONFIG_DIR="$ETC/keystone" "$VENV/bin/keystone-manage" --config-file "$ETC/keystone/keystone.conf" \
        "$@" >>"$LOGS/keystone-manage.log" 2>&1 || die "keystone-manage $1 failed; see $LOGS/keystone-manage.log"
}

keystone_configure() {
    mkdir -p "$ETC/keystone" "$DATA/keystone"
    export KILN_OPENSTACK_DIR KILN_HOST KILN_KEYSTONE_PORT VENV ETC DATA RUN LOGS
    local changed=1
    render "$INFRA_DIR/templates/keystone.conf" "$ETC/keystone/keystone.conf" && changed=0
    render "$INFRA_DIR/templates/keystone-uwsgi.ini" "$ETC/keystone/uwsgi.ini" && changed=0
    return $changed
}

keystone_prepare() {
    if [[ ! -f $DATA/keystone/.prepared ]]; then
        keystone_manage db_sync
        keystone_manage fernet_setup --keystone-user root --keystone-group root
        keystone_manage credential_setup --keystone-user root --keystone-group root
        touch "$DATA/keystone/.prepared"
    fi
}

keystone_start() {
    port_busy "$KILN_KEYSTONE_PORT" && die "keystone: port $KILN_KEYSTONE_PORT on $KILN_HOST is taken by another process"
    start_uwsgi keystone "$ETC/keystone/uwsgi.ini"
    wait_http "$(keystone_url)/v3" 60 || die "keystone did not answer within 60 s; see $LOGS/keystone.log"
    # bootstrap is idempotent: the admin user, project and role, the identity service and its endpoints
    OS_KEYSTONE_CONFIG_DIR="$ETC/keystone" "$VENV/bin/keystone-manage" --config-file "$ETC/keystone/keystone.conf" \
        bootstrap --bootstrap-password "$KILN_ADMIN_PASSWORD" --bootstrap-username admin \
        --bootstrap-project-name admin --bootstrap-role-name admin --bootstrap-service-name keystone \
        --bootstrap-region-id "$KILN_REGION" --bootstrap-admin-url "$(keystone_url)/v3" \
        --bootstrap-public-url "$(keystone_url)/v3" --bootstrap-internal-url "$(keystone_url)/v3" \
        >>"$LOGS/keystone-manage.log" 2>&1 || die "keystone-manage bootstrap failed; see $LOGS/keystone-manage.log"
}

keystone_healthy() {
    pid_of keystone >/dev/null && wait_http "$(keystone_url)/v3" 2
}
