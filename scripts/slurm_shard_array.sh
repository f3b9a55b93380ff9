#!/bin/bash
# Build one dataset on many machines at once: a SLURM job array, one `lmim shard` part per task.
# Submit from the repository root (SRC and DST as for `lmim shard`; any flag after them too):
#
#   sbatch --array=0-15 scripts/slurm_shard_array.sh /data/imagenet/train s3://my-bucket/in1k/train --workers 16
#
# `--part auto` reads this task's part (i of N) from SLURM_ARRAY_TASK_ID and the array's size, so the
# array's size is the number of parts. Each task builds the shards n with n % N == i; the task that
# finishes last writes manifest.json (two finishing at once both write the same bytes). A task that
# is killed or requeued finishes its part when it runs again; `lmim merge DST` re-does the merge by hand.
#
#SBATCH --job-name=lmim-shard
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16           # --workers processes read, check and write images in parallel
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --requeue
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: sbatch --array=0-(N-1) $0 SRC DST [lmim shard flags]" >&2; exit 2; }
exec lmim shard "$@" --part auto
