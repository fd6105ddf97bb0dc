#!/bin/bash
# One line per component: running (pid, answering) or stopped. Exit 0 when all named (default: all) answer.
set -euo pipefail
# shellcheck source=/dev/null  # lib.sh is checked on its own
source "$(dirname "$0")/lib.sh"

requested=("$@")
[[ ${#requested[@]} -gt 0 ]] || requested=("${ALL_COMPONENTS[@]}")
check_components "${requested[@]}"
rc=0
for c in "${requested[@]}"; do
    if [[ -x $VENV/bin/python ]] && "${c}_healthy" 2>/dev/null; then
        pids=""
        for d in $("${c}_daemons"); do pids+="$(pid_of "$d") "; done
        echo "$c: running (pid ${pids% })"
    else
        echo "$c: stopped"
        rc=1
    fi
done
[[ -f $CLOUDS_YAML ]] && echo "clouds.yaml: $CLOUDS_YAML"
exit $rc
