# shellcheck shell=bash
# A Neutron 29 API server (neutron.wsgi.api:application under uWSGI) with no agents and
# `transport_url = fake://`. ML2 has one mechanism driver, kiln's `kiln_tap` (neutron-kiln-tap/,
# installed into the venv): it binds the guest network's ports as plain tap devices, which the
# `guestnet` component carries into the guest network's namespace. Boot tests use `networks: none`
# unless they log in over SSH. Its migrations refuse SQLite, so the schema is built from the models and
# stamped with the migration heads.

neutron_requires() { echo keystone; }

neutron_packages() { echo "neutron==29.0.0"; }

neutron_daemons() { echo neutron; }

neutron_url() { echo "http://$KILN_HOST:$KILN_NEUTRON_PORT"; }

# the kiln_tap driver, installed (again) when its source changed: pip, no dependencies of its own
neutron_install_tap_driver() {
    local src="$INFRA_DIR/neutron-kiln-tap" stamp="$VENV/.kiln-tap-driver" sum
    sum="$(cd "$src" && find . -type f \( -name '*.py' -o -name '*.toml' \) -print0 | sort -z \
        | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)"
    [[ -f $stamp && "$(cat "$stamp")" == "$sum" ]] && return 1
    # built from a copy: setuptools writes build/ and *.egg-info next to the sources
    local tmp rc=0
    tmp="$(mktemp -d)"
    cp -r "$src/." "$tmp"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --no-deps --force-reinstall "$tmp" \
        >>"$LOGS/install.log" 2>&1 || rc=$?
    rm -rf "$tmp"
    [[ $rc -eq 0 ]] || die "installing neutron-kiln-tap failed; see $LOGS/install.log"
    echo "$sum" >"$stamp"
    say "neutron: installed the kiln_tap ML2 driver"
    return 0
}

neutron_configure() {
    mkdir -p "$ETC/neutron/plugins/ml2" "$DATA/neutron/lock"
    export KILN_OPENSTACK_DIR KILN_HOST KILN_KEYSTONE_PORT KILN_NEUTRON_PORT VENV ETC DATA RUN LOGS
    export KILN_NEUTRON_SERVICE_PASSWORD KILN_GUEST_NETWORK
    local changed=1
    neutron_install_tap_driver && changed=0
    render "$INFRA_DIR/templates/neutron.conf" "$ETC/neutron/neutron.conf" && changed=0
    render "$INFRA_DIR/templates/ml2_conf.ini" "$ETC/neutron/plugins/ml2/ml2_conf.ini" && changed=0
    render "$INFRA_DIR/templates/neutron-uwsgi.ini" "$ETC/neutron/uwsgi.ini" && changed=0
    if ! cmp -s "$VENV/etc/neutron/api-paste.ini" "$ETC/neutron/api-paste.ini"; then
        cp "$VENV/etc/neutron/api-paste.ini" "$ETC/neutron/api-paste.ini"
        changed=0
    fi
    return $changed
}

neutron_prepare() {
    [[ -f $DATA/neutron/.prepared ]] && return 0
    rm -f "$DATA/neutron/neutron.sqlite"
    "$VENV/bin/python" - "sqlite:///$DATA/neutron/neutron.sqlite" >>"$LOGS/neutron-manage.log" 2>&1 <<'PY' \
        || die "building neutron's schema failed; see $LOGS/neutron-manage.log"
import sys
import sqlalchemy
from neutron.db.migration.models import head
engine = sqlalchemy.create_engine(sys.argv[1])
head.get_metadata().create_all(engine)
print(f"created {len(head.get_metadata().tables)} tables")
PY
    "$VENV/bin/neutron-db-manage" --config-file "$ETC/neutron/neutron.conf" \
        --config-file "$ETC/neutron/plugins/ml2/ml2_conf.ini" stamp heads >>"$LOGS/neutron-manage.log" 2>&1 \
        || die "neutron-db-manage stamp heads failed; see $LOGS/neutron-manage.log"
    touch "$DATA/neutron/.prepared"
}

neutron_start() {
    port_busy "$KILN_NEUTRON_PORT" && die "neutron: port $KILN_NEUTRON_PORT on $KILN_HOST is taken by another process"
    start_uwsgi neutron "$ETC/neutron/uwsgi.ini"
    wait_http "$(neutron_url)/" 120 || die "neutron did not answer within 120 s; see $LOGS/neutron.log"
    # the first port look-up after a start answers 500 unless something listed networks first
    "$VENV/bin/python" - "$KILN_HOST" "$KILN_KEYSTONE_PORT" >>"$LOGS/neutron.log" 2>&1 <<'PY' \
        || die "neutron: GET /v2.0/networks failed; see $LOGS/neutron.log"
import os, sys
import openstack
conn = openstack.connect(auth_url=f"http://{sys.argv[1]}:{sys.argv[2]}/v3", username="neutron",
                         password=os.environ["KILN_NEUTRON_SERVICE_PASSWORD"], project_name="service",
                         user_domain_name="Default", project_domain_name="Default")
print("kiln-openstack: networks:", [n.name for n in conn.network.networks()])
PY
}

neutron_healthy() {
    pid_of neutron >/dev/null && wait_http "$(neutron_url)/" 2
}
