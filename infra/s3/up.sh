#!/bin/bash
# Start an S3 server on 127.0.0.1 for development and tests: moto's server mode from PyPI, in its own
# venv under one directory (default /var/lib/kiln-s3, or KILN_S3_DIR). Its state lives in memory: a
# restart starts with no buckets. Writes the credentials and endpoint to an env file and prints its
# path as the last line:   set -a; source "$(infra/s3/up.sh)"; set +a
# Idempotent: a server already answering is left running.
set -euo pipefail

KILN_S3_DIR="${KILN_S3_DIR:-/var/lib/kiln-s3}"
KILN_S3_PORT="${KILN_S3_PORT:-9000}"
KILN_S3_PYTHON="${KILN_S3_PYTHON:-python3}"
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="$KILN_S3_DIR/venv"
PIDFILE="$KILN_S3_DIR/moto.pid"
LOG="$KILN_S3_DIR/moto.log"
ENVFILE="$KILN_S3_DIR/s3.env"
URL="http://127.0.0.1:$KILN_S3_PORT"

say() { printf 'kiln-s3: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

mkdir -p "$KILN_S3_DIR"
chmod 700 "$KILN_S3_DIR"
exec 9>"$KILN_S3_DIR/.lock"
flock -w 300 9 || die "another up.sh or down.sh holds $KILN_S3_DIR/.lock"

want="$(sha256sum "$HERE/constraints.txt" | cut -d' ' -f1)"
if [[ ! -x $VENV/bin/moto_server || "$(cat "$VENV/.kiln-installed" 2>/dev/null)" != "$want" ]]; then
    start=$SECONDS
    [[ -x $VENV/bin/python ]] || "$KILN_S3_PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --progress-bar off \
        -c "$HERE/constraints.txt" 'moto[server]==5.2.5' >>"$KILN_S3_DIR/install.log" 2>&1 \
        || die "pip install failed; see $KILN_S3_DIR/install.log"
    echo "$want" >"$VENV/.kiln-installed"
    say "installed moto in $((SECONDS - start)) s"
fi

answers() {
    "$VENV/bin/python" - "$URL" "$1" <<'PY'
import sys, time, urllib.error, urllib.request
url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while True:
    try:
        urllib.request.urlopen(url + "/moto-api/", timeout=5).close()
        sys.exit(0)
    except urllib.error.HTTPError:
        sys.exit(0)
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.2)
PY
}

pid="$(cat "$PIDFILE" 2>/dev/null || true)"
if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && answers 2; then
    say "already running (pid $pid) at $URL"
else
    if (exec 3<>"/dev/tcp/127.0.0.1/$KILN_S3_PORT") 2>/dev/null; then
        die "port $KILN_S3_PORT on 127.0.0.1 is taken by another process (set KILN_S3_PORT)"
    fi
    setsid "$VENV/bin/moto_server" -H 127.0.0.1 -p "$KILN_S3_PORT" >>"$LOG" 2>&1 </dev/null 9>&- &
    echo $! >"$PIDFILE"
    answers 30 || die "the S3 server did not answer within 30 s; see $LOG"
    say "started (pid $(cat "$PIDFILE")) at $URL"
fi

if [[ ! -f $ENVFILE ]]; then
    umask 077
    {
        echo "AWS_ACCESS_KEY_ID=kiln"
        echo "AWS_SECRET_ACCESS_KEY=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')"
        echo "AWS_DEFAULT_REGION=us-east-1"
        echo "AWS_ENDPOINT_URL_S3=$URL"
    } >"$ENVFILE.partial"
    mv "$ENVFILE.partial" "$ENVFILE"
fi
# the endpoint follows the port of this run
sed -i "s|^AWS_ENDPOINT_URL_S3=.*|AWS_ENDPOINT_URL_S3=$URL|" "$ENVFILE"
echo "$ENVFILE"
