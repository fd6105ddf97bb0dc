#!/bin/bash
# Stop every daemon up.sh started (or only the named components), newest first. Data, venv and
# clouds.yaml stay for the next up.sh; `down.sh --purge` also removes the whole directory.
set -euo pipefail
# shellcheck source=/dev/null  # lib.sh is checked on its own
source "$(dirname "$0")/lib.sh"

purge=false
requested=()
for arg in "$@"; do
    case "$arg" in
        --purge) purge=true ;;
        *) requested+=("$arg") ;;
    esac
done
[[ ${#requested[@]} -gt 0 ]] || requested=("${ALL_COMPONENTS[@]}")
check_components "${requested[@]}"
[[ -d $KILN_OPENSTACK_DIR ]] || { say "nothing at $KILN_OPENSTACK_DIR"; exit 0; }

exec 9>"$KILN_OPENSTACK_DIR/.lock"
flock -w 600 9 || die "another up.sh or down.sh holds $KILN_OPENSTACK_DIR/.lock"

for ((i = ${#ALL_COMPONENTS[@]} - 1; i >= 0; i--)); do
    c=${ALL_COMPONENTS[$i]}
    for r in "${requested[@]}"; do
        if [[ $r == "$c" ]]; then stop_component "$c"; fi
    done
done

# anything still recorded (a daemon of a component this checkout no longer knows) goes too
if [[ ${#requested[@]} -eq ${#ALL_COMPONENTS[@]} ]]; then
    for f in "$RUN"/*.pid; do
        [[ -e $f ]] || continue
        stop_daemon "$(basename "$f" .pid)"
    done
fi

if $purge; then
    rm -rf -- "$KILN_OPENSTACK_DIR"
    say "removed $KILN_OPENSTACK_DIR"
fi
