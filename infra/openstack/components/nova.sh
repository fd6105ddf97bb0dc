# shellcheck shell=bash
# Nova 34: nova-api (nova.wsgi.osapi_compute under uWSGI), nova-conductor, nova-scheduler and
# nova-compute with the libvirt driver (QEMU in TCG mode); SQLite databases (API, cell0, cell1), RPC
# over this stack's RabbitMQ, config drives instead of a metadata service.

nova_requires() { echo keystone glance rabbitmq placement neutron guestnet libvirt; }

nova_packages() { echo "nova==34.0.0"; }

nova_debs() { echo genisoimage qemu-utils; }

nova_daemons() { echo nova-api nova-conductor nova-scheduler nova-compute; }

nova_url() { echo "http://$KILN_HOST:$KILN_NOVA_PORT"; }

# the name the compute service registers under: fixed, so that a restart finds its own records
KILN_NOVA_HOST="${KILN_NOVA_HOST:-kiln-compute}"

nova_manage() {
    "$VENV/bin/nova-manage" --config-file "$ETC/nova/nova.conf" "$@" >>"$LOGS/nova-manage.log" 2>&1
}

nova_configure() {
    mkdir -p "$ETC/nova" "$DATA/nova/instances" "$DATA/nova/lock"
    export KILN_OPENSTACK_DIR KILN_HOST KILN_KEYSTONE_PORT KILN_NOVA_PORT KILN_REGION VENV ETC DATA RUN LOGS
    export KILN_NOVA_SERVICE_PASSWORD KILN_PLACEMENT_SERVICE_PASSWORD KILN_NEUTRON_SERVICE_PASSWORD KILN_NOVA_HOST
    KILN_TRANSPORT_URL="$(rabbitmq_url)"
    KILN_LIBVIRT_URI="$(libvirt_uri)"
    export KILN_TRANSPORT_URL KILN_LIBVIRT_URI
    local changed=1
    render "$INFRA_DIR/templates/nova.conf" "$ETC/nova/nova.conf" && changed=0
    render "$INFRA_DIR/templates/nova-api-uwsgi.ini" "$ETC/nova/uwsgi.ini" && changed=0
    if ! cmp -s "$VENV/etc/nova/api-paste.ini" "$ETC/nova/api-paste.ini"; then
        cp "$VENV/etc/nova/api-paste.ini" "$ETC/nova/api-paste.ini"
        changed=0
    fi
    # UEFI guests with Debian 12's libvirt 9.0.0: see the script's docstring
    local rc=0
    "$VENV/bin/python" "$INFRA_DIR/nova_libvirt9_uefi.py" || rc=$?
    case $rc in
        0) say "nova: patched for UEFI guests on libvirt 9.0 (nova_libvirt9_uefi.py)"; changed=0 ;;
        1) ;;
        *) die "nova: nova_libvirt9_uefi.py cannot patch this Nova; see its message above" ;;
    esac
    return $changed
}

nova_prepare() {
    if [[ ! -f $DATA/nova/.prepared ]]; then
        nova_manage api_db sync || die "nova-manage api_db sync failed; see $LOGS/nova-manage.log"
        nova_manage cell_v2 map_cell0 --database_connection "sqlite:///$DATA/nova/nova_cell0.sqlite?timeout=60" \
            || die "nova-manage cell_v2 map_cell0 failed; see $LOGS/nova-manage.log"
        # exit code 2: a cell with this database and transport already exists (a half-finished earlier run)
        nova_manage cell_v2 create_cell --name cell1 --verbose || [[ $? -eq 2 ]] \
            || die "nova-manage cell_v2 create_cell failed; see $LOGS/nova-manage.log"
        nova_manage db sync || die "nova-manage db sync failed; see $LOGS/nova-manage.log"
        touch "$DATA/nova/.prepared"
    fi
    nova_sqlite_concurrency
}

# SQLite under Nova's concurrent writers (API, conductor, scheduler, compute): seen failing a spawn with
# "database is locked" when one server was deleted as the next was created. Every Nova database in WAL
# mode (readers no longer block a writer's commit), and every connection waits up to 60 s for the lock
# (`?timeout=60`: in nova.conf, and in the cell mappings an earlier up.sh stored without it). Idempotent.
nova_sqlite_concurrency() {
    "$VENV/bin/python" - "$DATA/nova" >>"$LOGS/nova-manage.log" 2>&1 <<'PY' \
        || die "nova: could not set up its SQLite databases for concurrent use; see $LOGS/nova-manage.log"
import os, sqlite3, sys
folder = sys.argv[1]
for name in ("nova_api", "nova_cell0", "nova"):
    path = os.path.join(folder, f"{name}.sqlite")
    if os.path.exists(path):
        with sqlite3.connect(path, timeout=60) as con:
            mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            sys.exit(f"{path}: journal_mode stays {mode}")
with sqlite3.connect(os.path.join(folder, "nova_api.sqlite"), timeout=60) as con:
    for cell_id, url in con.execute("SELECT id, database_connection FROM cell_mappings").fetchall():
        if url.startswith("sqlite:") and "timeout=" not in url:
            new = url + ("&" if "?" in url else "?") + "timeout=60"
            con.execute("UPDATE cell_mappings SET database_connection = ? WHERE id = ?", (new, cell_id))
            print(f"cell mapping {cell_id}: {new}")
PY
}

# nova_sql DB QUERY: the first column of the first row (SQLite; queries only)
nova_sql() {
    "$VENV/bin/python" - "$DATA/nova/$1.sqlite" "$2" <<'PY'
import sqlite3, sys
con = sqlite3.connect(sys.argv[1], timeout=10)  # (a WAL database: a read-only open could not make its -shm)
row = con.execute(sys.argv[2]).fetchone()
print(row[0] if row else "")
PY
}

nova_start() {
    port_busy "$KILN_NOVA_PORT" && die "nova: port $KILN_NOVA_PORT on $KILN_HOST is taken by another process"
    local d started
    started="$(date -u '+%Y-%m-%d %H:%M:%S')"
    for d in conductor scheduler compute; do
        start_daemon "nova-$d" "$VENV/bin/nova-$d" --config-file "$ETC/nova/nova.conf"
    done
    start_uwsgi nova-api "$ETC/nova/uwsgi.ini"
    wait_http "$(nova_url)/" 120 || die "nova-api did not answer within 120 s; see $LOGS/nova-api.log"
    # the compute node must be in the cell's database, mapped in the API's, and its service must have
    # reported since this start (else the scheduler counts it as down) before anything can land on it
    local found=""
    for _ in $(seq 1 120); do
        for d in conductor scheduler compute; do
            pid_of "nova-$d" >/dev/null || die "nova-$d exited; see $LOGS/nova-$d.log"
        done
        found="$(nova_sql nova "select count(*) from compute_nodes c join services s on s.host = c.host
            where c.deleted = 0 and s.deleted = 0 and s.binary = 'nova-compute' and c.host = '$KILN_NOVA_HOST'
            and coalesce(s.updated_at, s.created_at) >= '$started'" 2>/dev/null || true)"
        [[ ${found:-0} -gt 0 ]] && break
        sleep 1
    done
    [[ ${found:-0} -gt 0 ]] || die "nova-compute did not report its node within 120 s; see $LOGS/nova-compute.log"
    nova_manage cell_v2 discover_hosts --verbose || die "nova-manage cell_v2 discover_hosts failed"
    [[ "$(nova_sql nova_api "select count(*) from host_mappings where host = '$KILN_NOVA_HOST'")" -gt 0 ]] \
        || die "nova: host $KILN_NOVA_HOST is not mapped to a cell; see $LOGS/nova-manage.log"
}

nova_healthy() {
    local d
    for d in $(nova_daemons); do pid_of "$d" >/dev/null || return 1; done
    wait_http "$(nova_url)/" 2
}
