#!/usr/bin/env bash
# Shared Slurm launcher: one task per GPU via srun; pre-emption aware.
#
#   sbatch slurm/stage1_mim.sbatch [key.sub=value ...]      (the .sbatch files call this)
#
# With `#SBATCH --signal=B:USR1@180` Slurm signals this batch shell ~3 minutes before the time
# limit (or on pre-emption). We forward the signal to every task; the trainer saves a checkpoint
# and exits with code 3, and we requeue the job, which resumes from `latest`.
set -uo pipefail
config=${1:?usage: launch.sh CONFIG.yaml [key.sub=value ...]}
shift
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# Rendezvous: the trainer derives MASTER_ADDR (first host of SLURM_JOB_NODELIST) and the port
# (from SLURM_JOB_ID) itself, so every task agrees without extra variables.
srun --kill-on-bad-exit=1 "$python" -m megatron_finevit.train --config "$config" "$@" &
srun_pid=$!
forward() { echo "launch.sh: $1 received, asking the trainer to checkpoint and stop"; kill -USR1 "$srun_pid"; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
# `wait` returns early when a trapped signal arrives: keep waiting for srun itself.
while true; do
  wait "$srun_pid"; rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done
if [[ $rc -eq 3 && -n "${SLURM_JOB_ID:-}" ]]; then
  echo "launch.sh: checkpoint saved on signal; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"
