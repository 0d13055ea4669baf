#!/usr/bin/env bash
# Shared Slurm launcher: one task per GPU via srun; pre-emption aware.
#
#   sbatch slurm/stage1_mim.sbatch [key.sub=value ...]      (the .sbatch files call this)
#
# With `#SBATCH --signal=B:USR1@180` Slurm signals this batch shell ~3 minutes before the time
# limit (or on pre-emption). We forward the signal to every task; the trainer stops every rank at
# the same step, saves a checkpoint (if a step ran since the last one) and exits with code 3, and
# we requeue the job, which resumes from `latest`.
#
# Requeue contract: the trainer's rank 0 writes the file $FINEVIT_REQUEUE_MARKER once every rank
# has stopped on the signal with its checkpoint saved, and no rank exits before it exists (a final
# barrier). We requeue if and only if the marker exists, whatever srun's exit status: the first
# task to exit 3 makes srun end the others (--kill-on-bad-exit), so that status depends on which
# rank exits first — on a cluster of thousands of ranks, never the one we want. The marker lives
# in the job's working directory (every node sees it, as the checkpoints); set
# FINEVIT_REQUEUE_MARKER to put it elsewhere.
set -uo pipefail
config=${1:?usage: launch.sh CONFIG.yaml [key.sub=value ...]}
shift
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export FINEVIT_REQUEUE_MARKER=${FINEVIT_REQUEUE_MARKER:-$PWD/.finevit-requeue-${SLURM_JOB_ID:-local}}
rm -f "$FINEVIT_REQUEUE_MARKER"  # a requeued job keeps its id: drop the previous run's marker
# Rendezvous: the trainer derives MASTER_ADDR (first host of SLURM_JOB_NODELIST) and the port
# (from SLURM_JOB_ID) itself, so every task agrees without extra variables.
srun --kill-on-bad-exit=1 "$python" -m megatron_finevit.train --config "$config" "$@" &
srun_pid=$!
forward() { echo "launch.sh: $1 received, asking the trainer to checkpoint and stop"; kill -USR1 "$srun_pid"; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
# `wait` returns early when a trapped signal arrives: keep waiting for srun itself; a last `wait`
# on the exited srun gives its own status (not the signal's).
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done
wait "$srun_pid"; rc=$?
if [[ -e $FINEVIT_REQUEUE_MARKER ]]; then
  echo "launch.sh: srun exited $rc; $(cat "$FINEVIT_REQUEUE_MARKER")"
  rm -f "$FINEVIT_REQUEUE_MARKER"
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    echo "launch.sh: every rank stopped on the signal; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  exit 3
fi
exit "$rc"
