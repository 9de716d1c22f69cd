#!/usr/bin/env bash
# Keras Tuner chief/worker search on this machine: one chief (the gRPC oracle, which also
# writes the reports and retrains the best model when the search ends) and $WORKERS workers.
# Every argument is passed to `python -m bt_pipeline.tune`. Logs go to $LOG_DIR.
#
#   WORKERS=2 ORACLE_PORT=8000 bash tuning/run_distributed.sh --trials 20 --epochs 20
set -euo pipefail
WORKERS=${WORKERS:-2}
PY=${PY:-python}
LOG_DIR=${LOG_DIR:-runs/tune-distributed}
export KERASTUNER_ORACLE_IP=${KERASTUNER_ORACLE_IP:-127.0.0.1}
export KERASTUNER_ORACLE_PORT=${ORACLE_PORT:-8000}
mkdir -p "$LOG_DIR"

KERASTUNER_TUNER_ID=chief "$PY" -m bt_pipeline.tune "$@" >"$LOG_DIR/chief.log" 2>&1 &
chief=$!
workers=()
for ((i = 0; i < WORKERS; i++)); do
  # Workers share the cores: one TensorFlow thread each avoids oversubscription.
  KERASTUNER_TUNER_ID="tuner$i" "$PY" -m bt_pipeline.tune --threads 1 "$@" \
    >"$LOG_DIR/tuner$i.log" 2>&1 &
  workers+=($!)
done
trap 'kill "$chief" "${workers[@]}" 2>/dev/null || true' INT TERM

status=0
for pid in "${workers[@]}"; do wait "$pid" || status=1; done
wait "$chief" || status=1
echo "chief and $WORKERS worker(s) finished (status $status); logs in $LOG_DIR/"
tail -n 8 "$LOG_DIR/chief.log"
exit $status
