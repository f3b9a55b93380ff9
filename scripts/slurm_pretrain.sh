#!/bin/bash
# Latent MIM pretraining on several nodes with SLURM: one `accelerate launch` per node, each
# starting one process per GPU. Submit from the repository root:
#
#   sbatch --nodes 4 scripts/slurm_pretrain.sh --config vit_b16_in1k \
#       data.url=s3://my-bucket/in1k-train data.eval_url=s3://my-bucket/in1k-val run_dir=/shared/runs/b16
#
# Everything after the script name goes to lmim.train.pretrain (a preset or YAML, then key=value).
# run_dir must be on a file system all nodes share (checkpoints are written by every process).
# resume=auto is always added, so resubmitting the same command (or a requeue after preemption or
# a node failure) continues from the newest complete checkpoint; a first run starts fresh. Work
# since that checkpoint is redone: set checkpoint.every_steps to what you can afford to lose.
#
#SBATCH --job-name=lmim-pretrain
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1          # one launcher per node; it spawns one process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64           # DALI's CPU threads + the launcher
#SBATCH --time=72:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out

set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
NUM_NODES=${SLURM_NNODES:?run this with sbatch}
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
VENV=${VENV:-.venv}

# shellcheck disable=SC1091
source "$VENV/bin/activate"
# No OMP_NUM_THREADS default here: lmim splits each process's share of the node's cores between the
# model and the loader itself (and ignores the launcher's default of 1); a value exported here would
# cap that share, and with it the loader's threads (docs/TRAINING.md, "threads").
# NCCL picks the fastest interconnect itself; uncomment to pin an interface if it picks wrongly.
# export NCCL_SOCKET_IFNAME=ib0

ARGS=$(printf ' %q' "$@")   # the user's arguments, quoted for the inner shell
echo "nodes=$NUM_NODES gpus/node=$GPUS_PER_NODE main=$MAIN_HOST:$MAIN_PORT args: $*"

# srun starts one task per node; SLURM_NODEID is that node's rank (0 = the main process's node).
srun --kill-on-bad-exit=1 bash -c "accelerate launch \
    --multi_gpu \
    --num_machines $NUM_NODES \
    --num_processes $((NUM_NODES * GPUS_PER_NODE)) \
    --machine_rank \$SLURM_NODEID \
    --main_process_ip $MAIN_HOST \
    --main_process_port $MAIN_PORT \
    --rdzv_backend c10d \
    --mixed_precision bf16 \
    -m lmim.train.pretrain$ARGS resume=auto"
