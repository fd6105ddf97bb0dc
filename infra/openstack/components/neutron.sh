# shellcheck shell=bash
# A Neutron 29 API server (neutron.wsgi.api:application under uWSGI) with no agents: ML2 with no
# mechanism drivers and `transport_url = fake://`. It answers the port and network look-ups Nova makes
# (server show and delete); boots use `networks: none`. Its migrations refuse SQLite, so the schema is
# built from the models and stamped with the migration heads.

neutron_requires() { echo keystone; }

neutron_packages() { echo "neutron==29.0.0"; }

neutron_daemons() { echo neutron; }

neutron_url() { echo "http://$KILN_HOST:$KILN_NEUTRON_PORT"; }

neutron_configure() {
    mkdir -p "$ETC/neutron/plugins/ml2" "$DATA/neutron/lock"
    export KILN_OPENSTACK_DIR KILN_HOST KILN_KEYSTONE_PORT KILN_NEUTRON_PORT VENV ETC DATA RUN LOGS
    export KILN_NEUTRON_SERVICE_PASSWORD
    local changed=1
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
