#!/usr/bin/env bash
# One launcher for every scale: a laptop CPU, one GPU node, many nodes, SLURM.
#
#   trainer/run.sh [--help] --config RECIPE [key.sub=value ...]
#
# Everything after the options goes to `simmim pretrain`. Environment (each optional):
#   NNODES          nodes taking part                       (SLURM: SLURM_NNODES; else 1)
#   NODE_RANK       this node's rank                        (SLURM: SLURM_NODEID; else 0)
#   MASTER_ADDR     rendezvous host                         (SLURM: first host of SLURM_JOB_NODELIST;
#                                                            else localhost)
#   MASTER_PORT     rendezvous port                         (default 29500)
#   GPUS_PER_NODE   processes per node                      (default: the node's GPUs, or 1 without GPUs)
#   MAX_RESTARTS    torchrun restarts after a failed rank   (default 3; each resumes from the last checkpoint)
#   RDZV_ID         rendezvous id shared by the nodes       (SLURM: the job id; else "simmim")
#   PYTHON          interpreter with simmim installed       (default: .venv/bin/python if present, else python3)
#
# SIGTERM / SIGUSR1 (preemption, `sbatch --signal=USR1@120`) are passed to the trainer, which
# checkpoints and exits with 75; under SLURM the job is then requeued (`scontrol requeue`).
set -uo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  NNODES=${NNODES:-${SLURM_NNODES:-1}}
  NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
  if [[ -z "${MASTER_ADDR:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1)
  fi
  RDZV_ID=${RDZV_ID:-$SLURM_JOB_ID}
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-simmim}
MAX_RESTARTS=${MAX_RESTARTS:-3}
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || GPUS_PER_NODE=1
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / GPUS_PER_NODE > 0 ? $(nproc) / GPUS_PER_NODE : 1 ))}

echo "run.sh: $NNODES node(s) x $GPUS_PER_NODE process(es), node rank $NODE_RANK, rendezvous $MASTER_ADDR:$MASTER_PORT ($RDZV_ID)"
# simmim.trainer.launch is torchrun ending with the ranks' own lines (no SignalException or
# ChildFailedError traceback after them), waiting for the ranks' checkpoints after a signal
"$PYTHON" -m simmim.trainer.launch \
  --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$GPUS_PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID" \
  --max-restarts="$MAX_RESTARTS" \
  -m simmim.trainer.cli pretrain "$@" &
CHILD=$!
forward() { echo "run.sh: received $1, passing it on"; FORWARDED=1; kill -TERM "$CHILD" 2>/dev/null; }
trap 'forward SIGTERM' TERM
trap 'forward SIGUSR1' USR1
# Ctrl-C reaches every process of the terminal's group: the ranks stop after their step with a
# checkpoint (a second press, 5 s or more later, at once); wait for them rather than return early
trap 'echo "run.sh: Ctrl-C: the trainer stops after its step with a checkpoint"' INT
while true; do
  wait "$CHILD"; STATUS=$?
  kill -0 "$CHILD" 2>/dev/null || break  # wait returns early when a trapped signal arrives
done

if [[ -n "${FORWARDED:-}" ]]; then  # the trainer wrote a checkpoint on the way out
  if [[ -n "${SLURM_JOB_ID:-}" && "$NODE_RANK" == 0 ]]; then
    echo "run.sh: stopped with a checkpoint: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || true
  fi
  exit 75
fi
exit $STATUS
