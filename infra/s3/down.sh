#!/bin/bash
# Stop the S3 server infra/s3/up.sh started (its data is in memory and goes with it).
# `down.sh --purge` also removes its directory.
set -euo pipefail
KILN_S3_DIR="${KILN_S3_DIR:-/var/lib/kiln-s3}"
PIDFILE="$KILN_S3_DIR/moto.pid"
say() { printf 'kiln-s3: %s\n' "$*" >&2; }

pid="$(cat "$PIDFILE" 2>/dev/null || true)"
if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    say "stopped (pid $pid)"
else
    say "not running"
fi
rm -f "$PIDFILE"
if [[ ${1:-} == --purge ]]; then
    rm -rf -- "$KILN_S3_DIR"
    say "removed $KILN_S3_DIR"
fi
