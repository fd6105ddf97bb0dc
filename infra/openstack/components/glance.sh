# shellcheck shell=bash
# Glance 33 as glance.wsgi.api:application under uWSGI on 127.0.0.1: SQLite, a file store, Keystone auth.

glance_requires() { echo keystone; }

glance_packages() { echo "glance==33.0.0"; }

glance_daemons() { echo glance; }

glance_url() { echo "http://$KILN_HOST:$KILN_GLANCE_PORT"; }

glance_configure() {
    mkdir -p "$ETC/glance" "$DATA/glance/images" "$DATA/glance/staging" "$DATA/glance/tasks"
    export KILN_OPENSTACK_DIR KILN_HOST KILN_KEYSTONE_PORT KILN_GLANCE_PORT VENV ETC DATA RUN LOGS
    export KILN_GLANCE_SERVICE_PASSWORD
    local changed=1 paste
    render "$INFRA_DIR/templates/glance-api.conf" "$ETC/glance/glance-api.conf" && changed=0
    render "$INFRA_DIR/templates/glance-uwsgi.ini" "$ETC/glance/uwsgi.ini" && changed=0
    # the paste pipeline glance ships, with the healthcheck's disable file moved under our directory
    paste="$(ls "$VENV"/etc/glance/glance-api-paste.ini)"
    if ! sed "s|^disable_by_file_path = .*|disable_by_file_path = $ETC/glance/healthcheck_disable|" "$paste" \
        | cmp -s - "$ETC/glance/glance-api-paste.ini"; then
        sed "s|^disable_by_file_path = .*|disable_by_file_path = $ETC/glance/healthcheck_disable|" "$paste" \
            >"$ETC/glance/glance-api-paste.ini"
        changed=0
    fi
    return $changed
}

glance_prepare() {
    if [[ ! -f $DATA/glance/.prepared ]]; then
        "$VENV/bin/glance-manage" --config-dir "$ETC/glance" db_sync >>"$LOGS/glance-manage.log" 2>&1 \
            || die "glance-manage db_sync failed; see $LOGS/glance-manage.log"
        touch "$DATA/glance/.prepared"
    fi
}

glance_start() {
    port_busy "$KILN_GLANCE_PORT" && die "glance: port $KILN_GLANCE_PORT on $KILN_HOST is taken by another process"
    start_uwsgi glance "$ETC/glance/uwsgi.ini"
    wait_http "$(glance_url)/healthcheck" 90 || die "glance did not answer within 90 s; see $LOGS/glance.log"
}

glance_healthy() {
    pid_of glance >/dev/null && wait_http "$(glance_url)/healthcheck" 2
}
