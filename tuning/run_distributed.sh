#!/usr/bin/env bash
# Keras Tuner chief/worker search on this machine: one chief (the gRPC oracle, which also
# writes the reports and retrains the best model when the search ends) and $WORKERS workers.
# Every argument is passed to `python -m bt_pipeline tune`. Logs go to $LOG_DIR.
#
# A worker that dies (killed, crashed, out of memory) is started again under the same tuner
# id, up to $MAX_RESTARTS times: the oracle hands an id its unfinished trial back, so the lost
# trial is re-run and recorded once instead of being dropped (and the chief is not left
# waiting for it forever).
#
#   WORKERS=2 ORACLE_PORT=8000 bash tuning/run_distributed.sh --trials 20 --epochs 20
set -uo pipefail
WORKERS=${WORKERS:-2}
MAX_RESTARTS=${MAX_RESTARTS:-3}
PY=${PY:-python}
LOG_DIR=${LOG_DIR:-runs/tune-distributed}
export KERASTUNER_ORACLE_IP=${KERASTUNER_ORACLE_IP:-127.0.0.1}
export KERASTUNER_ORACLE_PORT=${ORACLE_PORT:-8000}
mkdir -p "$LOG_DIR"

run_worker() {
  local id=$1 restarts=0 status
  shift
  while true; do
    # Workers share the cores: one TensorFlow thread each avoids oversubscription.
    KERASTUNER_TUNER_ID="$id" "$PY" -m bt_pipeline tune --threads 1 "$@" >>"$LOG_DIR/$id.log" 2>&1
    status=$?
    [ "$status" -eq 0 ] && return 0
    restarts=$((restarts + 1))
    if [ "$restarts" -gt "$MAX_RESTARTS" ]; then
      echo "worker $id failed $restarts times (last exit $status); giving up" >&2
      return 1
    fi
    echo "worker $id died (exit $status); restart $restarts/$MAX_RESTARTS resumes its trial" \
      | tee -a "$LOG_DIR/$id.log" >&2
  done
}

KERASTUNER_TUNER_ID=chief "$PY" -m bt_pipeline tune "$@" >"$LOG_DIR/chief.log" 2>&1 &
chief=$!
workers=()
for ((i = 0; i < WORKERS; i++)); do
  run_worker "tuner$i" "$@" &
  workers+=($!)
done
trap 'kill "$chief" "${workers[@]}" 2>/dev/null; pkill -P $$ 2>/dev/null; exit 130' INT TERM

status=0
for pid in "${workers[@]}"; do wait "$pid" || status=1; done
if [ "$status" -ne 0 ]; then
  kill "$chief" 2>/dev/null  # no worker left to finish the search
fi
wait "$chief" || status=1
echo "chief and $WORKERS worker(s) finished (status $status); logs in $LOG_DIR/"
tail -n 8 "$LOG_DIR/chief.log"
exit $status
