#!/usr/bin/env bash
# A private one-node Slurm cluster for tests (see /work/shared/SLURM.md).
#
#   .ci/slurm.sh start  [DIR]   install packages if missing, start munged + slurmctld + slurmd,
#                               wait until the node is idle; last stdout line: SLURM_CONF=DIR/slurm.conf
#   .ci/slurm.sh stop   [DIR]   stop the daemons started in DIR (by their pid files)
#   .ci/slurm.sh status [DIR]   sinfo against DIR's cluster; exit 0 only if the node is usable
#
# DIR defaults to $ZO_SLURM_DIR or /tmp/zo_scale_slurm. Everything (munge key and socket, state,
# spool, logs, pids) lives in DIR and the ports are free ones picked at start, so several clusters
# (e.g. two pytest sessions) can run on one machine without touching /etc or each other.
# Needs root (slurmd launches tasks; apt installs packages).
set -euo pipefail

cmd=${1:-}
DIR=${2:-${ZO_SLURM_DIR:-/tmp/zo_scale_slurm}}
CPUS=${SLURM_CI_CPUS:-2}
PACKAGES="slurmctld slurmd slurm-client munge"

log() { echo "[slurm.sh] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v srun >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "slurm packages missing and not root: cannot apt-get install $PACKAGES"
    command -v apt-get >/dev/null || die "slurm packages missing and no apt-get"
    log "installing $PACKAGES"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq $PACKAGES >&2
}

# Our own munged: its key, socket and pid file in DIR, so /etc/munge and any system munged are
# untouched. slurm.conf points every Slurm component at the socket via AuthInfo.
start_munge() {
    mkdir -p "$DIR/munge"
    chmod 700 "$DIR/munge"
    head -c 1024 /dev/urandom > "$DIR/munge/munge.key"
    chmod 400 "$DIR/munge/munge.key"
    munged --force \
        --socket="$DIR/munge/munge.sock" \
        --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" \
        --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed"
    munge -S "$DIR/munge/munge.sock" -n | unmunge -S "$DIR/munge/munge.sock" >/dev/null \
        || die "munge self-test failed; see $DIR/munge/munged.log"
}

write_conf() {
    local host ctld_port slurmd_port
    host=$(hostname -s)
    ctld_port=$(free_port)
    slurmd_port=$(free_port)
    while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port=$(free_port); done
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat > "$DIR/slurm.conf" <<EOF
ClusterName=zo-ci-$ctld_port
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.sock
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
# Random first job id: two test clusters on one machine then derive different MASTER_PORTs.
FirstJobId=$((1000 + RANDOM * 30))
# Take CPUs below as the truth: a machine with fewer cores must not drain the node.
SlurmdParameters=config_overrides
# Start batch jobs on submit, not up to 3 s later (batch_sched_delay); short timers so a failed
# task ends its step quickly in tests.
SchedulerParameters=batch_sched_delay=0
KillWait=5
MinJobAge=30
InactiveLimit=0
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() {
    SLURM_CONF="$DIR/slurm.conf" sinfo -h -N -o '%t' 2>/dev/null | head -n1
}

# A pid file names a live daemon only if that pid still runs the program the file is named after
# (a stale file's pid may since belong to something else, which we must not signal).
pid_alive() {
    local pid
    [ -f "$1" ] || return 1
    pid=$(cat "$1")
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$(basename "$1" .pid)" ]
}

start() {
    [ "$(id -u)" = 0 ] || die "must run as root (slurmd launches tasks as any user)"
    install_packages
    if pid_alive "$DIR/slurmctld.pid"; then
        die "a cluster is already running in $DIR; run '$0 stop $DIR' first"
    fi
    # Reuse DIR only if it is empty or one of ours: never wipe a directory we did not make.
    if [ -d "$DIR" ] && [ -n "$(ls -A "$DIR")" ] && [ ! -f "$DIR/.zo_slurm" ]; then
        die "$DIR exists, is not empty and is not a zo_scale slurm dir"
    fi
    rm -rf "$DIR"
    mkdir -p "$DIR"
    chmod 700 "$DIR"
    touch "$DIR/.zo_slurm"
    start_munge
    write_conf
    export SLURM_CONF="$DIR/slurm.conf"
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF"
    # The node registers within a few seconds; wait for it rather than sleeping a fixed time.
    local state=""
    for _ in $(seq 1 60); do
        state=$(node_state)
        case "$state" in idle | mix | alloc) break ;; esac
        sleep 0.5
    done
    case "$state" in
        idle | mix | alloc) ;;
        *)
            tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
            stop
            die "node not idle after 30 s (state '$state')"
            ;;
    esac
    log "cluster up in $DIR (node $(hostname -s), $CPUS CPUs)"
    echo "SLURM_CONF=$SLURM_CONF"
}

stop() {
    # TERM all daemons at once (each takes ~2 s to exit), then wait; KILL what is left after 10 s.
    local pids=() f pid
    for f in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munge/munged.pid"; do
        if pid_alive "$f"; then
            pid=$(cat "$f")
            kill "$pid" 2>/dev/null && pids+=("$pid")
        fi
    done
    for _ in $(seq 1 100); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    log "stopped daemons in $DIR"
}

status() {
    [ -f "$DIR/slurm.conf" ] || die "no cluster configured in $DIR"
    SLURM_CONF="$DIR/slurm.conf" sinfo -N
    case "$(node_state)" in idle | mix | alloc) ;; *) exit 1 ;; esac
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    install) install_packages ;;
    *) echo "usage: $0 start|stop|status|install [DIR]" >&2; exit 2 ;;
esac
