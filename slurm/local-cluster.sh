#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine: for CI, and for a dry run of slurm/*.sbatch before
# a shared cluster sees them.
#
#   slurm/local-cluster.sh start    install slurm-wlm + munge when missing (Debian/Ubuntu, as root), write a
#                                   one-node slurm.conf, start munged, slurmctld and slurmd; wait until idle
#   slurm/local-cluster.sh status   exit 0 when the node answers idle or mixed or allocated
#   slurm/local-cluster.sh stop     stop the daemons this script started
#
# The node is this host (short hostname) with all its CPUs and most of its memory. Daemons run as root
# (SlurmUser=root): this is a throwaway cluster, never a template for a shared one. State and logs live in
# $SCGPT_SLURM_DIR (default /var/tmp/scgpt-slurm).
set -euo pipefail

STATE_DIR=${SCGPT_SLURM_DIR:-/var/tmp/scgpt-slurm}
CONF_DIR=/etc/slurm
NODE=$(hostname -s)

log() { echo "local-cluster: $*" >&2; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        log "must run as root (installs packages and starts slurmctld/slurmd)"; exit 1
    fi
}

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

write_config() {
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    mkdir -p "$CONF_DIR" "$STATE_DIR"/{ctld,d,log}
    cat >"$CONF_DIR/slurm.conf" <<EOF
# Written by scgpt slurm/local-cluster.sh: a single-node test cluster.
ClusterName=scgpt-local
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
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
NodeName=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
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

node_ready() {
    local state
    state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n1) || return 1
    case "$state" in idle*|mix*|alloc*) return 0 ;; *) return 1 ;; esac
}

start() {
    need_root
    if command -v sinfo >/dev/null && node_ready; then
        log "already up: $(sinfo -h -o '%P %t %D %C' | head -n1)"; return 0
    fi
    install_packages
    write_config
    start_munge
    pgrep -x slurmctld >/dev/null || { log "starting slurmctld"; /usr/sbin/slurmctld; }
    pgrep -x slurmd >/dev/null || { log "starting slurmd"; /usr/sbin/slurmd; }
    for _ in $(seq 60); do
        if node_ready; then
            log "up: $(sinfo -h -o '%P %t %D %C' | head -n1)"; return 0
        fi
        state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n1 || true)
        case "$state" in down*|drain*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;; esac
        sleep 1
    done
    log "the node did not come up; see $STATE_DIR/log/"
    tail -n 20 "$STATE_DIR"/log/*.log >&2 || true
    exit 1
}

stop() {
    need_root
    for pidfile in "$STATE_DIR/slurmd.pid" "$STATE_DIR/slurmctld.pid"; do
        if [ -s "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; fi
    done
    log "stopped slurmd and slurmctld (munged left running)"
}

case "${1:-start}" in
    start) start ;;
    status) command -v sinfo >/dev/null && node_ready ;;
    stop) stop ;;
    *) echo "usage: $0 [start|status|stop]" >&2; exit 2 ;;
esac
