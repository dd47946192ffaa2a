#!/usr/bin/env bash
# A real SLURM cluster of one or more nodes on this machine: for CI, and for a dry run of slurm/*.sbatch
# before a shared cluster sees them.
#
#   slurm/local-cluster.sh start [--nodes N]   install slurm-wlm + munge when missing (Debian/Ubuntu, as root),
#                                              write a slurm.conf of N nodes (default 1), start munged,
#                                              slurmctld and one `slurmd -N <node>` per node; wait until idle
#   slurm/local-cluster.sh status [--nodes N]  exit 0 when at least N nodes answer idle, mixed or allocated
#   slurm/local-cluster.sh stop                stop the slurmd and slurmctld daemons this script started
#
# Every node is this host: nodes scgpt-node1..N, each with all its CPUs and a share of its memory, each
# slurmd on its own port (6818, 6819, ...), all at 127.0.0.1. The node names are added to /etc/hosts, so
# they resolve like the hostnames of a real cluster (the sbatch scripts take MASTER_ADDR from the first
# one). `start` is idempotent: a running cluster of at least N nodes is left as it is (its jobs keep running).
# Asking for more nodes than run rewrites slurm.conf and restarts the daemons, which drops every job, so
# it is refused while jobs are queued or running. Daemons run as root (SlurmUser=root): this is a throwaway
# cluster, never a template for a shared one. State and logs live in $SCGPT_SLURM_DIR (default
# /var/tmp/scgpt-slurm).
set -euo pipefail

STATE_DIR=${SCGPT_SLURM_DIR:-/var/tmp/scgpt-slurm}
CONF_DIR=/etc/slurm
HOST=$(hostname -s)
PREFIX=scgpt-node
FIRST_PORT=6818
HOSTS_TAG="# scgpt slurm/local-cluster.sh"

log() { echo "local-cluster: $*" >&2; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        log "must run as root (installs packages and starts slurmctld/slurmd)"; exit 1
    fi
}

node_names() { seq -f "$PREFIX%g" 1 "$1"; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return
    fi
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

config() {
    # the slurm.conf of an N-node cluster, on stdout
    local nodes=$1 cpus mem_mb i
    cpus=$(nproc)
    mem_mb=$(awk -v n="$nodes" '/MemTotal/ {printf "%d", $2 / 1024 * 0.9 / n}' /proc/meminfo)
    {
        cat <<EOF
# Written by scgpt slurm/local-cluster.sh: a $nodes-node test cluster, every node this host.
ClusterName=scgpt-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d/%n
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
SlurmctldPort=6817
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
EOF
        for i in $(seq 1 "$nodes"); do
            echo "NodeName=$PREFIX$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((FIRST_PORT + i - 1))" \
                "CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=$PREFIX[1-$nodes] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
    }
}

add_hosts_entries() {
    # the node names resolve (to this host), as a real cluster's do: MASTER_ADDR is the first node's name
    local line kept
    line="127.0.0.1 $(node_names "$1" | paste -sd' ' -) $HOSTS_TAG"
    grep -qxF "$line" /etc/hosts 2>/dev/null && return
    kept=$(grep -v -F "$HOSTS_TAG" /etc/hosts || true)
    # rewritten in place: /etc/hosts is often a bind mount (containers) that cannot be replaced by a rename
    if ! printf '%s\n%s\n' "$kept" "$line" >/etc/hosts; then
        log "cannot add the node names to /etc/hosts; add this line by hand: $line"; exit 1
    fi
}

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating a munge key"
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 0400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        log "starting munged"
        if id munge >/dev/null 2>&1; then
            runuser -u munge -- /usr/sbin/munged
        else
            /usr/sbin/munged --force
        fi
    fi
}

ready_nodes() {
    # how many of this script's nodes answer idle, mixed or allocated
    sinfo -h -N -o '%N %t' 2>/dev/null | awk -v p="$PREFIX" 'index($1, p) == 1 && $2 ~ /^(idle|mix|alloc)/ {print $1}' \
        | sort -u | wc -l
}

cluster_ready() {
    # at least N of this script's nodes are up (a larger running cluster serves a smaller request as it is)
    command -v sinfo >/dev/null || return 1
    [ "$(ready_nodes)" -ge "$1" ]
}

stop_daemons() {
    local pidfile pid
    for pidfile in "$STATE_DIR"/slurmd*.pid "$STATE_DIR/slurmctld.pid"; do
        pid=$(cat "$pidfile" 2>/dev/null) || continue
        [ -n "$pid" ] || continue
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done  # the daemon removes its pid file
        rm -f "$pidfile"
    done
}

start_daemons() {
    local nodes=$1 clean=$2 node
    if ! [ -s "$STATE_DIR/slurmctld.pid" ] || ! kill -0 "$(cat "$STATE_DIR/slurmctld.pid")" 2>/dev/null; then
        log "starting slurmctld"
        if [ "$clean" = 1 ]; then /usr/sbin/slurmctld -c; else /usr/sbin/slurmctld; fi
    fi
    for node in $(node_names "$nodes"); do
        mkdir -p "$STATE_DIR/d/$node"
        local pidfile="$STATE_DIR/slurmd-$node.pid"
        if ! [ -s "$pidfile" ] || ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            log "starting slurmd -N $node"
            /usr/sbin/slurmd -N "$node"
        fi
    done
}

wait_until_ready() {
    local nodes=$1 node state
    for _ in $(seq 90); do
        if cluster_ready "$nodes"; then
            log "up: $(sinfo -h -o '%P %t %D %C' | head -n1) ($(node_names "$nodes" | paste -sd, -))"; return 0
        fi
        for node in $(node_names "$nodes"); do
            state=$(sinfo -h -n "$node" -o %t 2>/dev/null | head -n1 || true)
            case "$state" in down*|drain*) scontrol update nodename="$node" state=resume 2>/dev/null || true ;; esac
        done
        sleep 1
    done
    log "the $nodes nodes did not come up; see $STATE_DIR/log/"
    tail -n 20 "$STATE_DIR"/log/*.log >&2 || true
    exit 1
}

refuse_if_busy() {
    # a restart drops every job: not while someone else's job is queued or running
    local jobs
    jobs=$(squeue -h -o %i 2>/dev/null | wc -l) || jobs=0
    if [ "$jobs" -gt 0 ]; then
        log "$jobs job(s) queued or running on the $(ready_nodes)-node cluster; a $1-node cluster means a restart" \
            "that drops them: wait for them (squeue) or scancel them, then start --nodes $1 again"
        exit 1
    fi
}

start() {
    local nodes=$1 clean=0
    need_root
    if cluster_ready "$nodes"; then
        log "already up: $(sinfo -h -o '%P %t %D %C %N' | head -n1)"; return 0
    fi
    install_packages
    mkdir -p "$CONF_DIR" "$STATE_DIR"/{ctld,d,log}
    if [ "$(config "$nodes")" != "$(cat "$CONF_DIR/slurm.conf" 2>/dev/null)" ]; then
        refuse_if_busy "$nodes"
        log "writing a $nodes-node $CONF_DIR/slurm.conf"
        stop_daemons  # another node list: the controller starts with a clean state
        config "$nodes" >"$CONF_DIR/slurm.conf"
        clean=1
    fi
    add_hosts_entries "$nodes"
    start_munge
    start_daemons "$nodes" "$clean"
    wait_until_ready "$nodes"
}

stop() {
    need_root
    stop_daemons
    log "stopped slurmd and slurmctld (munged left running)"
}

parse_nodes() {
    local nodes=1
    while [ $# -gt 0 ]; do
        case "$1" in
            --nodes) nodes=${2:?--nodes needs a number}; shift 2 ;;
            --nodes=*) nodes=${1#--nodes=}; shift ;;
            *) echo "local-cluster: unknown option $1; usage: $0 start|status [--nodes N]" >&2; exit 2 ;;
        esac
    done
    case "$nodes" in
        ''|*[!0-9]*|0) echo "local-cluster: --nodes $nodes: give a positive number of nodes" >&2; exit 2 ;;
    esac
    echo "$nodes"
}

command=${1:-start}
[ $# -gt 0 ] && shift
case "$command" in
    start) nodes=$(parse_nodes "$@") || exit 2; start "$nodes" ;;
    status) nodes=$(parse_nodes "$@") || exit 2; cluster_ready "$nodes" ;;
    stop) stop ;;
    *) echo "usage: $0 start|status [--nodes N] | stop" >&2; exit 2 ;;
esac
