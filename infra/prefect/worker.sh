#!/bin/bash
# A kiln build host: one Prefect process worker on the `kiln` pool. Run as root (builds need it).
#
#   PREFECT_API_URL     the fleet's Prefect server, e.g. http://prefect.example:4200/api (required)
#   PREFECT_API_AUTH_STRING  its credentials: PREFECT_SERVER_API_AUTH_STRING of the server's env file
#                       (required; keep it in a 0600 file such as /etc/kiln/worker.env)
#   KILN_ALLOWED_PATHS  host paths, besides KILN_DIR and KILN_CACHE, that a run started from the UI or the API
#                       may name (output directories, element directories, file:// mirrors, keyrings),
#                       colon-separated
#   KILN_WORKER_QUEUES  queues to serve (default: builds; one host in the fleet also serves control,
#                       the queue of the nightly refresh and matrix runs, which only coordinate)
#   KILN_WORKER_LIMIT   flow runs at once on this worker (default: unlimited; the host's CPU, disk and
#                       KVM concurrency limits kiln-<host>-* decide how many builds really run)
#   KILN_HOST           this host's name in those limits (default: the short hostname)
#   KILN_HOST_LIMITS    their sizes when kiln creates them, e.g. cpu=8,disk=400,kvm=4
#   KILN_CACHE, KILN_STATE, DIB_DISTRIBUTION_MIRROR …: passed on to every build
#   KILN_DIR            the kiln checkout, at the same path on every host (default /opt/kiln)
set -euo pipefail
: "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server of the fleet}"
: "${PREFECT_API_AUTH_STRING:?set PREFECT_API_AUTH_STRING to the credentials of the server (PREFECT_SERVER_API_AUTH_STRING in its env file)}"
KILN_DIR=${KILN_DIR:-/opt/kiln}
QUEUES=${KILN_WORKER_QUEUES:-builds}
NAME=${KILN_WORKER_NAME:-kiln-$(hostname -s)}
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false PYTHONUNBUFFERED=1
export PREFECT_LOGGING_EXTRA_LOGGERS=kiln PREFECT_RESULTS_PERSIST_BY_DEFAULT=true
# flow runs send heartbeats; the server's automation (created below, once) marks a silent one Crashed, and a
# matrix cell whose host died is built again on another host
export PREFECT_FLOWS_HEARTBEAT_FREQUENCY=${PREFECT_FLOWS_HEARTBEAT_FREQUENCY:-30}
args=(worker start --pool kiln --type process --name "$NAME")
for q in ${QUEUES//,/ }; do args+=(--work-queue "$q"); done
[ -n "${KILN_WORKER_LIMIT:-}" ] && args+=(--limit "$KILN_WORKER_LIMIT")
cd "$KILN_DIR"
"$KILN_DIR/.venv/bin/python" -c 'import os
from kiln.server import serve
serve.ensure_work_pool(os.environ["PREFECT_API_URL"])
serve.ensure_zombie_automation(os.environ["PREFECT_API_URL"])'
exec "$KILN_DIR/.venv/bin/prefect" "${args[@]}"
