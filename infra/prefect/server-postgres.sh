#!/bin/bash
# A production Prefect server for kiln: PostgreSQL-backed, reachable by the build hosts.
# Run as root on the server host (Debian 12). Idempotent: a second run changes nothing that exists.
#
#   KILN_PREFECT_HOST   address the server listens on (default 0.0.0.0; the UI and workers use it)
#   KILN_PREFECT_PORT   port (default 4200)
#   KILN_PREFECT_URL    URL the browsers and workers use (default http://$(hostname -f):PORT/api)
#   KILN_DB_PASSWORD    password of the database role `prefect` (default: generated once, kept in
#                       /etc/kiln/prefect-server.env)
#   KILN_VENV           virtualenv with kiln (and so prefect 3.9.1) installed (default /opt/kiln/.venv)
#
# It installs PostgreSQL, creates the role and database, writes /etc/kiln/prefect-server.env and
# either installs the systemd unit (when systemd runs) or starts the server in the background with
# its log in /var/log/kiln/prefect-server.log.
set -euo pipefail

HOST=${KILN_PREFECT_HOST:-0.0.0.0}
PORT=${KILN_PREFECT_PORT:-4200}
URL=${KILN_PREFECT_URL:-http://$(hostname -f):${PORT}/api}
VENV=${KILN_VENV:-/opt/kiln/.venv}
HERE=$(cd "$(dirname "$0")" && pwd)
ENV_FILE=/etc/kiln/prefect-server.env

if ! command -v pg_ctlcluster >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql
fi
pg_ctlcluster --skip-systemctl-redirect 15 main start 2>/dev/null || true   # no-op when it runs

mkdir -p /etc/kiln /var/log/kiln
if [ ! -f "$ENV_FILE" ]; then
    PASSWORD=${KILN_DB_PASSWORD:-$(head -c 18 /dev/urandom | base64 | tr -d '/+=')}
    umask 077
    cat > "$ENV_FILE" <<ENV
PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://prefect:${PASSWORD}@127.0.0.1:5432/prefect
PREFECT_SERVER_API_HOST=${HOST}
PREFECT_SERVER_API_PORT=${PORT}
PREFECT_UI_API_URL=${URL}
PREFECT_HOME=/var/lib/kiln/prefect-server
DO_NOT_TRACK=1
PREFECT_SERVER_ANALYTICS_ENABLED=false
ENV
fi
PASSWORD=$(sed -n 's|.*://prefect:\([^@]*\)@.*|\1|p' "$ENV_FILE")
runuser -u postgres -- psql -qtAc "SELECT 1 FROM pg_roles WHERE rolname='prefect'" | grep -q 1 \
    || runuser -u postgres -- psql -qc "CREATE ROLE prefect LOGIN PASSWORD '${PASSWORD}'"
runuser -u postgres -- psql -qtAc "SELECT 1 FROM pg_database WHERE datname='prefect'" | grep -q 1 \
    || runuser -u postgres -- createdb -O prefect prefect
mkdir -p /var/lib/kiln/prefect-server

if [ -d /run/systemd/system ]; then
    sed "s|@VENV@|${VENV}|g" "$HERE/systemd/kiln-prefect-server.service" > /etc/systemd/system/kiln-prefect-server.service
    systemctl daemon-reload
    systemctl enable --now kiln-prefect-server.service
else
    if ! curl -fsS "http://127.0.0.1:${PORT}/api/health" >/dev/null 2>&1; then
        set -a; . "$ENV_FILE"; set +a
        setsid "$VENV/bin/prefect" server start --host "$HOST" --port "$PORT" \
            >>/var/log/kiln/prefect-server.log 2>&1 < /dev/null &
        echo $! > /run/kiln-prefect-server.pid
    fi
fi
for _ in $(seq 1 120); do
    curl -fsS "http://127.0.0.1:${PORT}/api/health" >/dev/null 2>&1 && break
    sleep 1
done
curl -fsS "http://127.0.0.1:${PORT}/api/health" >/dev/null || { echo "the Prefect server did not answer" >&2; exit 1; }
echo "Prefect server (PostgreSQL) on ${URL%/api}; register kiln's deployments from a checkout with:"
echo "  PREFECT_API_URL=${URL} prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml"
