# --- Worldline: signal forwarding and the requeue decision (shared by both templates) -------
# SLURM sends the warning signal (--signal=B:USR1@N) to this batch shell only, and SIGTERM on
# preemption. The shell forwards either to the launcher (srun), which forwards it to every
# rank; the ranks finish the current step, agree to stop, checkpoint and exit, and rank 0
# writes $RUN_DIR/status.json. The job is requeued only when the run is not finished.
wl_signal=""
wl_pid=""
wl_forward() {
  [[ -z "$wl_signal" ]] && wl_signal=$1
  echo "worldline-batch: caught SIG$1 at $(date +%T); forwarding to the ranks" >&2
  [[ -n "$wl_pid" ]] && kill -s "$1" "$wl_pid" 2>/dev/null
  return 0
}
trap 'wl_forward USR1' USR1
trap 'wl_forward TERM' TERM

# wl_launch CMD...: run the launcher in the background (a trap only runs once `wait` returns)
# and keep waiting until it has really exited.
wl_launch() {
  rm -f "$RUN_DIR/status.json"
  "$@" &
  wl_pid=$!
  local rc=0
  wait "$wl_pid" || rc=$?
  while kill -0 "$wl_pid" 2>/dev/null; do rc=0; wait "$wl_pid" || rc=$?; done
  return "$rc"
}

# wl_finish RC: exit 0 if the run finished; requeue if it stopped (or a stop signal came and
# it did not finish); otherwise fail with RC. A finished run is never requeued.
wl_finish() {
  local rc=$1 state=none restarts=${SLURM_RESTART_COUNT:-0}
  if [[ -f "$RUN_DIR/status.json" ]]; then
    state=$(grep -o '"state": *"[a-z]*"' "$RUN_DIR/status.json" | grep -o '[a-z]*"$' | tr -d '"')
  fi
  echo "worldline-batch: launcher exited $rc, run state '$state', signal '${wl_signal:-none}', restart $restarts" >&2
  if [[ "$state" == finished ]]; then
    exit 0
  fi
  if [[ "$state" == stopped || -n "$wl_signal" ]]; then
    if (( restarts >= MAX_RESTARTS )); then
      echo "worldline-batch: not requeueing: $restarts restarts (slurm.max_restarts=$MAX_RESTARTS)" >&2
      exit 1
    fi
    echo "worldline-batch: requeueing job $SLURM_JOB_ID to resume from $RUN_DIR" >&2
    # SLURM SIGTERMs this shell at once (the trap just records it); under proctrack/pgid the
    # scontrol process itself may be killed (exit 143) after the requeue was accepted.
    scontrol requeue "$SLURM_JOB_ID" || true
    exit 0
  fi
  exit "$rc"
}
# ----------------------------------------------------------------------------------------------
