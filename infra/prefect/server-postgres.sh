#!/bin/bash
# A production Prefect server for kiln: PostgreSQL-backed (Debian's postgresql), reachable by the build
# hosts. Run as root on the server host (Debian 12). Idempotent: a second run changes nothing that exists.
#
#   infra/prefect/server-postgres.sh          install (once) and start; prints the API URL as its last line
#   infra/prefect/server-postgres.sh stop     stop the server it started (not PostgreSQL)
#
#   KILN_PREFECT_HOST   address the server listens on (default 127.0.0.1: put the address the build hosts
#                       reach, or a TLS proxy in front; never an address you do not mean to expose)
#   KILN_PREFECT_PORT   port (default 4200)
#   KILN_PREFECT_URL    URL the browsers and workers use (default http://HOST:PORT/api)
#   KILN_DB_NAME        the database and its owner role (default prefect)
#   KILN_DB_PASSWORD    password of the database role (default: generated once, kept in the env file)
#   KILN_PREFECT_ENV    the server's environment file (default /etc/kiln/prefect-server.env, mode 0600)
#   KILN_PREFECT_HOME   its PREFECT_HOME (default /var/lib/kiln/prefect-server)
#   KILN_PREFECT_LOG    its log without systemd (default /var/log/kiln/prefect-server.log)
#   KILN_VENV           virtualenv with kiln (and so prefect 3.9.1) installed (default /opt/kiln/.venv)
#
# It installs PostgreSQL and creates its cluster when missing, creates the role and database, writes the
# env file and either installs the systemd unit (when systemd runs) or starts the server in the
# background (its pid beside the env file).
#
# The API answers no one without credentials: the env file holds a generated PREFECT_SERVER_API_AUTH_STRING
# (kiln:<random>), which every worker and client sets as PREFECT_API_AUTH_STRING and a browser types into the
# UI's login page; CSRF protection is on and CORS allows only the UI's own origin. The server speaks plain
# HTTP: across any network you do not trust, put a TLS proxy in front (docs/scale-out.md).
set -euo pipefail

HOST=${KILN_PREFECT_HOST:-127.0.0.1}
PORT=${KILN_PREFECT_PORT:-4200}
URL=${KILN_PREFECT_URL:-http://${HOST}:${PORT}/api}
DB=${KILN_DB_NAME:-prefect}
VENV=${KILN_VENV:-/opt/kiln/.venv}
HERE=$(cd "$(dirname "$0")" && pwd)
ENV_FILE=${KILN_PREFECT_ENV:-/etc/kiln/prefect-server.env}
PREFECT_HOME_DIR=${KILN_PREFECT_HOME:-/var/lib/kiln/prefect-server}
LOG=${KILN_PREFECT_LOG:-/var/log/kiln/prefect-server.log}
PID_FILE=${ENV_FILE%.env}.pid

say() { echo "server-postgres: $*" >&2; }

if [[ ${1:-} == stop ]]; then
    if [[ -f $PID_FILE ]] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
        pid=$(cat "$PID_FILE")
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
        for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$pid" 2>/dev/null || true
        say "stopped the Prefect server (pid $pid)"
    fi
    rm -f "$PID_FILE"
    exit 0
fi

if ! command -v pg_ctlcluster >/dev/null || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    say "installing PostgreSQL"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2
fi
PG_VERSION=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -type d -printf "%f\n" | sort -V | tail -1)
if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$PG_VERSION main"; then
    say "creating the PostgreSQL $PG_VERSION cluster main"
    pg_createcluster "$PG_VERSION" main >&2
fi
pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" main start >/dev/null 2>&1 || true   # no-op when it runs
for _ in $(seq 1 60); do runuser -u postgres -- pg_isready -q && break; sleep 0.5; done
runuser -u postgres -- pg_isready -q || { say "PostgreSQL $PG_VERSION main does not answer"; exit 1; }

mkdir -p "$(dirname "$ENV_FILE")" "$(dirname "$LOG")" "$PREFECT_HOME_DIR"
if [[ ! -f $ENV_FILE ]]; then
    PASSWORD=${KILN_DB_PASSWORD:-$(head -c 18 /dev/urandom | base64 | tr -d '/+=')}
    (
        umask 077
        cat > "$ENV_FILE" <<ENV
PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://${DB}:${PASSWORD}@127.0.0.1:5432/${DB}
PREFECT_SERVER_API_HOST=${HOST}
PREFECT_SERVER_API_PORT=${PORT}
PREFECT_UI_API_URL=${URL}
PREFECT_HOME=${PREFECT_HOME_DIR}
DO_NOT_TRACK=1
PREFECT_SERVER_ANALYTICS_ENABLED=false
ENV
    )
fi
# credentials, CSRF and CORS (added to an env file an earlier install wrote without them)
if ! grep -q '^PREFECT_SERVER_API_AUTH_STRING=' "$ENV_FILE"; then
    echo "PREFECT_SERVER_API_AUTH_STRING=kiln:$(head -c 32 /dev/urandom | base64 | tr -d '/+=')" >> "$ENV_FILE"
fi
grep -q '^PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED=' "$ENV_FILE" \
    || echo "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED=true" >> "$ENV_FILE"
grep -q '^PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS=' "$ENV_FILE" \
    || echo "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS=$(sed -n 's|^PREFECT_UI_API_URL=\(.*\)/api$|\1|p' "$ENV_FILE")" \
        >> "$ENV_FILE"
chmod 600 "$ENV_FILE"
DB=$(sed -n 's|.*@127.0.0.1:5432/\(.*\)$|\1|p' "$ENV_FILE")
PASSWORD=$(sed -n 's|.*://[^:]*:\([^@]*\)@.*|\1|p' "$ENV_FILE")
# the role is the database's own and its password is the env file's (a role left by an earlier install
# with another password would lock the server out)
runuser -u postgres -- psql -qtAc "SELECT 1 FROM pg_roles WHERE rolname='${DB}'" | grep -q 1 \
    || runuser -u postgres -- psql -qc "CREATE ROLE \"${DB}\" LOGIN"
runuser -u postgres -- psql -qc "ALTER ROLE \"${DB}\" LOGIN PASSWORD '${PASSWORD}'"
runuser -u postgres -- psql -qtAc "SELECT 1 FROM pg_database WHERE datname='${DB}'" | grep -q 1 \
    || runuser -u postgres -- createdb -O "$DB" "$DB"
HOST=$(sed -n 's|^PREFECT_SERVER_API_HOST=||p' "$ENV_FILE")
PORT=$(sed -n 's|^PREFECT_SERVER_API_PORT=||p' "$ENV_FILE")
URL=$(sed -n 's|^PREFECT_UI_API_URL=||p' "$ENV_FILE")

healthy() { curl -fsS --noproxy '*' "http://${HOST}:${PORT}/api/health" >/dev/null 2>&1; }
if [[ -d /run/systemd/system ]]; then
    sed -e "s|@VENV@|${VENV}|g" -e "s|@ENV_FILE@|${ENV_FILE}|g" "$HERE/systemd/kiln-prefect-server.service" \
        > /etc/systemd/system/kiln-prefect-server.service
    systemctl daemon-reload
    systemctl enable --now kiln-prefect-server.service
elif ! healthy; then
    (
        set -a
        # shellcheck source=/dev/null
        . "$ENV_FILE"
        set +a
        exec setsid "$VENV/bin/prefect" server start --host "$HOST" --port "$PORT" >>"$LOG" 2>&1 </dev/null
    ) &
    echo $! > "$PID_FILE"
fi
for _ in $(seq 1 180); do healthy && break; sleep 1; done
healthy || { say "the Prefect server did not answer on ${HOST}:${PORT}; see $LOG"; exit 1; }
say "Prefect server (PostgreSQL database ${DB}) on ${URL%/api}; it answers only with the credentials in"
say "  ${ENV_FILE} (PREFECT_SERVER_API_AUTH_STRING): give them to each worker as PREFECT_API_AUTH_STRING."
say "Register kiln's deployments from a checkout with:"
say "  PREFECT_API_URL=${URL} PREFECT_API_AUTH_STRING=… prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml"
echo "$URL"
