#!/bin/bash
# Install (once) and start a single-node OpenStack on 127.0.0.1 under one directory, register its
# users, services and endpoints, write clouds.yaml (cloud `kiln-dev`) and print its path as the last line.
#
#   infra/openstack/up.sh                 # keystone glance
#   infra/openstack/up.sh glance          # the same: components pull in what they need
#   infra/openstack/up.sh nova            # the whole stack: + rabbitmq placement neutron libvirt nova
#   KILN_OPENSTACK_DIR=/srv/os infra/openstack/up.sh
#
# Idempotent: a component already answering is left running (restarted only when its config changed).
set -euo pipefail
# shellcheck source=/dev/null  # lib.sh is checked on its own
source "$(dirname "$0")/lib.sh"

requested=("$@")
[[ ${#requested[@]} -gt 0 ]] || requested=(keystone glance)
check_components "${requested[@]}"
mapfile -t components < <(resolve_components "${requested[@]}")

start_all=$SECONDS
ensure_dirs
exec 9>"$KILN_OPENSTACK_DIR/.lock"
flock -w 600 9 || die "another up.sh or down.sh holds $KILN_OPENSTACK_DIR/.lock"

install_debs "${components[@]}"
install_venv "${components[@]}"
load_secrets

# register.py PHASE: identity (projects, users, services, endpoints, clouds.yaml) as soon as Keystone
# answers, because the services authenticate with their users when they start; compute (the boot-test
# flavor) once Nova answers. The catalog lists the components asked for and those already running, and
# no others: a compute endpoint in it means a Nova that answers (kiln's in-use check and nova gate rely on it).
register() {
    local t=$SECONDS c listed=()
    for c in "${ALL_COMPONENTS[@]}"; do
        if [[ " ${components[*]} " == *" $c "* ]] || "${c}_healthy" 2>/dev/null; then listed+=("$c"); fi
    done
    "$VENV/bin/python" "$INFRA_DIR/register.py" --phase "$1" --clouds-yaml "$CLOUDS_YAML" \
        --keystone-url "http://$KILN_HOST:$KILN_KEYSTONE_PORT/v3" --region "$KILN_REGION" \
        --glance-url "http://$KILN_HOST:$KILN_GLANCE_PORT" \
        --placement-url "http://$KILN_HOST:$KILN_PLACEMENT_PORT" \
        --nova-url "http://$KILN_HOST:$KILN_NOVA_PORT/v2.1" \
        --neutron-url "http://$KILN_HOST:$KILN_NEUTRON_PORT" "${listed[@]}" \
        >>"$LOGS/register.log" 2>&1 || die "registration ($1) failed; see $LOGS/register.log"
    say "registered ($1) in $((SECONDS - t)) s"
}

for c in "${components[@]}"; do
    t=$SECONDS
    changed=false
    "${c}_configure" && changed=true
    "${c}_prepare"
    if "${c}_healthy"; then
        if $changed; then
            say "$c: configuration changed; restarting"
            stop_component "$c"
            "${c}_start"
            say "$c: started in $((SECONDS - t)) s"
        else
            say "$c: already running"
        fi
    else
        stop_component "$c"   # a half-dead one: clear it first
        "${c}_start"
        say "$c: started in $((SECONDS - t)) s"
    fi
    if [[ $c == keystone ]]; then register identity; fi
done
for c in "${components[@]}"; do
    if [[ $c == nova ]]; then register compute; fi
done
say "up in $((SECONDS - start_all)) s: ${components[*]}; logs in $LOGS"
say "use it with: export OS_CLIENT_CONFIG_FILE=$CLOUDS_YAML OS_CLOUD=kiln-dev"
echo "$CLOUDS_YAML"
