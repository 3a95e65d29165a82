#!/usr/bin/env bash
# The one launcher behind every sbatch script in slurm/.
#
#   exec "$COPD_HOME/slurm/launch.sh" COMMAND [ARGS...]      (from inside an sbatch script)
#
# Runs COMMAND once per task of the allocation with `srun` (one task per GPU: the sbatch files
# ask for --ntasks-per-node = GPUs per node). Each task finds its rank in SLURM_PROCID /
# SLURM_LOCALID / SLURM_STEP_NUM_TASKS and the rendezvous in MASTER_ADDR / MASTER_PORT, which
# this script exports (megatron_copd.runtime.distributed.launch_env reads them).
#
# Why srun per GPU and not torchrun per node: SLURM then owns every rank. Signals reach each
# process directly (no agent in between that turns a worker's exit code into its own: torchrun
# reports a failed worker as exit 1, which would hide the requeue code below), there is no second
# rendezvous to configure, pyxis/enroot containers work per task, and `scancel`/`sstat` see the
# real processes.
#
# Preemption and time limits: the sbatch files ask for `--signal=B:USR1@<grace>` and
# `--requeue`. The trap below forwards USR1 (and TERM) to the srun step; copd finishes its step,
# writes a checkpoint and every rank exits with EXIT_REQUEUE; this script then calls
# `scontrol requeue`, and the restarted job resumes from the run directory's `latest` checkpoint.
#
# Settings (environment variables, [default]):
#   COPD_HOME              working directory, the repository checkout [$SLURM_SUBMIT_DIR]
#   COPD_VENV              virtualenv to activate on bare metal (not with a container) []
#   COPD_SITE_ENV          sourced before launching: NCCL/network/module settings
#                          [$COPD_HOME/slurm/site_env.sh if it exists]
#   COPD_LOG_DIR           root of the per-job log folders [$COPD_HOME/logs]
#   COPD_RANK_LOGS         1 = one output file per rank in the job's log folder [0]
#   COPD_MASTER_ADDR       rendezvous host [first host of the allocation]
#   COPD_MASTER_PORT       rendezvous port [20000 + job id % 20000]
#   COPD_CONTAINER_IMAGE   pyxis/enroot image: a .sqsh file or docker://... [none: bare metal]
#   COPD_CONTAINER_MOUNTS  pyxis mounts, src:dst[,src:dst] [$COPD_HOME:$COPD_HOME]
#   COPD_CONTAINER_WORKDIR working directory inside the container [$COPD_HOME]
#   COPD_SRUN_ARGS         extra srun arguments, split on spaces []
#   COPD_EXIT_WAIT         seconds the other ranks get after the first one exits (srun --wait);
#                          a crashed rank thus ends the job after this long [120]
#   COPD_MAX_REQUEUES      do not requeue once SLURM_RESTART_COUNT reaches this [20]
#   COPD_DRY_RUN           1 = print the srun command line and exit [0]
set -uo pipefail

# Keep equal to megatron_copd/runtime/exit_codes.py (tests/test_launch.py checks it).
EXIT_REQUEUE=75

log() { echo "[copd launch $(date '+%F %T')] $*"; }
die() { echo "[copd launch] error: $*" >&2; exit 2; }

[ $# -ge 1 ] || die "usage: launch.sh COMMAND [ARGS...]"
[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a SLURM job (submit an sbatch script from slurm/)"

COPD_HOME=${COPD_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$COPD_HOME" || die "COPD_HOME=$COPD_HOME: no such directory"

if [ -n "${COPD_VENV:-}" ]; then
  [ -f "$COPD_VENV/bin/activate" ] || die "COPD_VENV=$COPD_VENV: no bin/activate there"
  # shellcheck disable=SC1091
  source "$COPD_VENV/bin/activate"
fi
site_env=${COPD_SITE_ENV:-$COPD_HOME/slurm/site_env.sh}
if [ -f "$site_env" ]; then
  # shellcheck disable=SC1090
  source "$site_env"
elif [ -n "${COPD_SITE_ENV:-}" ]; then
  die "COPD_SITE_ENV=$COPD_SITE_ENV: no such file"
fi

# --- rendezvous --------------------------------------------------------------------------------
if [ -z "${COPD_MASTER_ADDR:-}" ]; then
  COPD_MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi
MASTER_ADDR=$COPD_MASTER_ADDR
MASTER_PORT=${COPD_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
# SLURM >= 22.05: srun no longer inherits the batch's --cpus-per-task.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}
fi

# --- logs: one folder per job (requeued runs append to the same one) -----------------------------
job_log_dir=${COPD_LOG_DIR:-$COPD_HOME/logs}/${SLURM_JOB_NAME:-job}-$SLURM_JOB_ID
mkdir -p "$job_log_dir" || die "cannot create the log folder $job_log_dir"
restart=${SLURM_RESTART_COUNT:-0}

# --- the srun command ---------------------------------------------------------------------------
srun_args=(--kill-on-bad-exit=0 "--wait=${COPD_EXIT_WAIT:-120}" --export=ALL)
if [ "${COPD_RANK_LOGS:-0}" = 1 ]; then
  srun_args+=("--output=$job_log_dir/run$restart-rank%t.log")
fi
if [ -n "${COPD_CONTAINER_IMAGE:-}" ]; then
  srun_args+=(
    "--container-image=$COPD_CONTAINER_IMAGE"
    "--container-mounts=${COPD_CONTAINER_MOUNTS:-$COPD_HOME:$COPD_HOME}"
    "--container-workdir=${COPD_CONTAINER_WORKDIR:-$COPD_HOME}"
  )
fi
if [ -n "${COPD_SRUN_ARGS:-}" ]; then
  read -r -a extra <<< "$COPD_SRUN_ARGS"
  srun_args+=("${extra[@]}")
fi
cmd=(srun "${srun_args[@]}" "$@")

{
  echo "job=$SLURM_JOB_ID name=${SLURM_JOB_NAME:-} restart=$restart"
  echo "nodes=${SLURM_JOB_NODELIST:-} ntasks=${SLURM_NTASKS:-} master=$MASTER_ADDR:$MASTER_PORT"
  echo "command: ${cmd[*]}"
} >> "$job_log_dir/launch.txt"
log "job $SLURM_JOB_ID (restart $restart) on ${SLURM_JOB_NODELIST:-?}," \
  "${SLURM_NTASKS:-?} tasks, master $MASTER_ADDR:$MASTER_PORT, logs $job_log_dir"
log "running: ${cmd[*]}"
if [ "${COPD_DRY_RUN:-0}" = 1 ]; then
  exit 0
fi

# --- run, forwarding preemption signals -------------------------------------------------------
got_signal=
trapped=0
# shellcheck disable=SC2317  # called from the traps below
forward() {
  trapped=1
  got_signal=$1
  log "received SIG$1: forwarding to the job step (checkpoint, then requeue)"
  kill -s "$1" "$srun_pid" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

"${cmd[@]}" &
srun_pid=$!
# A trapped signal interrupts `wait`; wait again until the step itself has ended.
rc=
while :; do
  trapped=0
  wait "$srun_pid"
  status=$?
  if [ "$status" = 127 ] && [ -n "$rc" ]; then
    break  # the step had ended just before the signal: keep its status
  fi
  rc=$status
  if [ "$trapped" = 1 ] && [ "$status" -gt 128 ]; then
    continue  # woken by the trap, not by the step: its real status comes with the next wait
  fi
  break
done
trap - USR1 TERM

if [ "$rc" = "$EXIT_REQUEUE" ]; then
  if [ "$restart" -ge "${COPD_MAX_REQUEUES:-20}" ]; then
    log "step asked for a requeue, but the job already restarted $restart times" \
      "(COPD_MAX_REQUEUES=${COPD_MAX_REQUEUES:-20}); not requeueing"
    exit "$rc"
  fi
  log "step exited with the requeue code after a checkpoint: requeueing job $SLURM_JOB_ID"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    log "scontrol requeue failed (was the job submitted with --requeue?); resubmit it by hand:" \
      "the run resumes from its latest checkpoint"
  fi
  exit "$rc"
fi
if [ -n "$got_signal" ] && [ "$rc" != 0 ]; then
  log "step ended with exit code $rc after SIG$got_signal, without the requeue code:" \
    "no complete checkpoint was reported, not requeueing"
fi
log "step finished with exit code $rc"
exit "$rc"
