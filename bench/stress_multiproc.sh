#!/usr/bin/env bash
# Issue #15: run the tests that start process groups many times beside a CPU-bound job, and count the runs
# in which a process aborted at teardown ("terminate called without an active exception", SIGABRT).
#
#   bench/stress_multiproc.sh [-n RUNS] [-C CHECKOUT] [-o LOGDIR] [PYTEST_ARGS...]
#
# RUNS (default 30) pytest runs of PYTEST_ARGS (default: $DEFAULT_TESTS below, both torchrun- and
# mp.spawn-started groups), each beside one `yes > /dev/null` that keeps a core busy (the abort needs a
# gloo worker thread to be descheduled at the wrong moment). CHECKOUT (default: this one) is the code
# under test, so an older commit can be measured with this script: git archive REV | tar -x -C DIR.
# Every run's output is kept in LOGDIR; the last line is the count.
set -uo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
RUNS=30 CHECKOUT=$HERE LOGDIR=$(mktemp -d /tmp/zo_stress.XXXXXX)
while getopts "n:C:o:" opt; do
    case $opt in
        n) RUNS=$OPTARG ;;
        C) CHECKOUT=$(cd "$OPTARG" && pwd) ;;
        o) LOGDIR=$OPTARG ;;
        *) exit 2 ;;
    esac
done
shift $((OPTIND - 1))
DEFAULT_TESTS=(
    tests/test_evaluate.py::test_two_ranks_match_one_process       # mp.spawn, gloo, transformers model
    tests/test_distributed.py::test_torchrun_allreduce             # torchrun
    tests/test_distributed.py::test_deepspeed_launcher_allreduce   # deepspeed launcher
    tests/test_distributed.py::test_dead_peer_fails_fast           # a rank that leaves / a peer that errors
    tests/test_distributed.py::test_teardown_frees_every_group     # FSDP2 imported after the group (issue #15)
    tests/test_distributed.py::test_failing_rank_exits_with_its_own_code
)
[ $# -gt 0 ] || set -- "${DEFAULT_TESTS[@]}"
PY=${PYTHON:-python}
mkdir -p "$LOGDIR"

yes > /dev/null &
LOAD=$!
trap 'kill $LOAD 2>/dev/null' EXIT

aborted=0 failed=0 start=$SECONDS
for i in $(seq 1 "$RUNS"); do
    log=$LOGDIR/run$i.txt
    (cd "$CHECKOUT" && PYTHONPATH=$CHECKOUT "$PY" -m pytest -q -p no:cacheprovider "$@") > "$log" 2>&1
    rc=$?
    aborts=$(grep -c -e "terminate called" -e "SIGABRT" -e "signal 6" "$log")
    [ "$aborts" -gt 0 ] && aborted=$((aborted + 1))
    [ "$rc" -ne 0 ] && failed=$((failed + 1))
    echo "run $i/$RUNS: exit $rc, abort lines $aborts, $(tail -n 1 "$log")"
done
echo "stress_multiproc: $aborted of $RUNS runs aborted, $failed failed, $((SECONDS - start)) s, logs in $LOGDIR"
