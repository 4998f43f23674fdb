#!/usr/bin/env bash
# Issue #23: launch a user's own FSDP2 script (bench/user_fsdp2_loop.py: it starts and destroys its own
# process group) many times beside a CPU-bound job, and count the launches in which a rank aborted at
# exit ("terminate called without an active exception", SIGABRT).
#
#   bench/stress_user_teardown.sh [-n RUNS] [-L HOGS] [-C CHECKOUT] [-o LOGDIR] [SCRIPT_ARGS...]
#
# RUNS (default 20) launches of `torchrun --nproc_per_node 2`, each beside HOGS (default 1) `yes > /dev/null`
# CPU hogs (the abort needs a gloo worker thread descheduled at the wrong moment; -L 0: none). CHECKOUT (default: this one) is the zo_scale
# imported by the script, so the same script measures another commit: git archive REV | tar -x -C DIR.
# Every launch's output is kept in LOGDIR; the last line is the count.
set -uo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
RUNS=20 HOGS=1 CHECKOUT=$HERE LOGDIR=$(mktemp -d /tmp/zo_user_stress.XXXXXX)
while getopts "n:L:C:o:" opt; do
    case $opt in
        n) RUNS=$OPTARG ;;
        L) HOGS=$OPTARG ;;
        C) CHECKOUT=$(cd "$OPTARG" && pwd) ;;
        o) LOGDIR=$OPTARG ;;
        *) exit 2 ;;
    esac
done
shift $((OPTIND - 1))
TORCHRUN=${TORCHRUN:-torchrun}
mkdir -p "$LOGDIR"

LOAD=()
for _ in $(seq 1 "$HOGS"); do
    yes > /dev/null &
    LOAD+=($!)
done
trap '[ ${#LOAD[@]} -eq 0 ] || kill "${LOAD[@]}" 2>/dev/null' EXIT

aborted=0 failed=0 start=$SECONDS
for i in $(seq 1 "$RUNS"); do
    log=$LOGDIR/run$i.txt
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    PYTHONPATH=$CHECKOUT OMP_NUM_THREADS=1 timeout 300 "$TORCHRUN" --nproc_per_node 2 --master_port "$port" \
        "$HERE/bench/user_fsdp2_loop.py" "$@" > "$log" 2>&1
    rc=$?
    aborts=$(grep -c -e "terminate called" -e "SIGABRT" -e "Signals.SIGABRT" -e "signal 6" "$log")
    [ "$aborts" -gt 0 ] && aborted=$((aborted + 1))
    [ "$rc" -ne 0 ] && failed=$((failed + 1))
    echo "run $i/$RUNS: exit $rc, abort lines $aborts"
done
echo "stress_user_teardown: $aborted of $RUNS launches aborted, $failed failed, $((SECONDS - start)) s, logs in $LOGDIR"
