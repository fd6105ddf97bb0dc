# shellcheck shell=bash
# RabbitMQ (Debian's rabbitmq-server) on 127.0.0.1 for Nova's RPC: its own epmd on a private port, its
# node, database, cookie and config under KILN_OPENSTACK_DIR; the host's /etc/rabbitmq is not read.

rabbitmq_requires() { :; }

rabbitmq_packages() { :; }

rabbitmq_debs() { echo rabbitmq-server; }

rabbitmq_daemons() { echo epmd rabbitmq; }

rabbitmq_url() { echo "rabbit://nova:$KILN_RABBITMQ_PASSWORD@$KILN_HOST:$KILN_RABBITMQ_PORT/"; }

# the environment every rabbitmq-* command of this stack runs with
rabbitmq_env() {
    export HOME="$DATA/rabbitmq"   # the Erlang cookie lives in $HOME
    export ERL_EPMD_PORT="$KILN_EPMD_PORT" ERL_EPMD_ADDRESS="$KILN_HOST"
    export RABBITMQ_NODENAME=kiln@localhost
    export RABBITMQ_CONF_ENV_FILE="$ETC/rabbitmq/rabbitmq-env.conf"
    export RABBITMQ_CONFIG_FILE="$ETC/rabbitmq/rabbitmq.conf"
    export RABBITMQ_ADVANCED_CONFIG_FILE="$ETC/rabbitmq/advanced.config"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$ETC/rabbitmq/enabled_plugins"
    export RABBITMQ_MNESIA_BASE="$DATA/rabbitmq/mnesia"
    export RABBITMQ_LOG_BASE="$LOGS" RABBITMQ_LOGS=-
    export RABBITMQ_DIST_PORT="$KILN_RABBITMQ_DIST_PORT"
    # no busy-waiting schedulers: on 2 cores they would take CPU from the guests
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="+sbwt none +sbwtdcpu none +sbwtdio none -kernel inet_dist_use_interface {127,0,0,1}"
}

rabbitmq_configure() {
    mkdir -p "$ETC/rabbitmq" "$DATA/rabbitmq/mnesia"
    export KILN_HOST KILN_RABBITMQ_PORT KILN_RABBITMQ_PASSWORD
    local changed=1
    render "$INFRA_DIR/templates/rabbitmq.conf" "$ETC/rabbitmq/rabbitmq.conf" && changed=0
    [[ -f $ETC/rabbitmq/rabbitmq-env.conf ]] || : >"$ETC/rabbitmq/rabbitmq-env.conf"
    [[ -f $ETC/rabbitmq/enabled_plugins ]] || echo '[].' >"$ETC/rabbitmq/enabled_plugins"
    return $changed
}

rabbitmq_prepare() { :; }

rabbitmq_start() {
    port_busy "$KILN_RABBITMQ_PORT" && die "rabbitmq: port $KILN_RABBITMQ_PORT on $KILN_HOST is taken by another process"
    port_busy "$KILN_EPMD_PORT" && die "rabbitmq: epmd port $KILN_EPMD_PORT on $KILN_HOST is taken by another process"
    rabbitmq_env
    start_daemon epmd epmd -port "$KILN_EPMD_PORT" -address "$KILN_HOST"
    wait_port "$KILN_EPMD_PORT" 10 epmd || die "epmd did not listen on $KILN_EPMD_PORT; see $LOGS/epmd.log"
    # the user and its password come from rabbitmq.conf (default_user/default_pass) on the first start;
    # change_password keeps them in step afterwards
    start_daemon rabbitmq /usr/lib/rabbitmq/bin/rabbitmq-server
    wait_port "$KILN_RABBITMQ_PORT" 120 rabbitmq || die "rabbitmq did not listen within 120 s; see $LOGS/rabbitmq.log"
    /usr/lib/rabbitmq/bin/rabbitmqctl -q change_password nova "$KILN_RABBITMQ_PASSWORD" >>"$LOGS/rabbitmq.log" 2>&1 \
        || die "rabbitmqctl change_password failed; see $LOGS/rabbitmq.log"
}

rabbitmq_healthy() {
    pid_of epmd >/dev/null && pid_of rabbitmq >/dev/null && port_busy "$KILN_RABBITMQ_PORT"
}
