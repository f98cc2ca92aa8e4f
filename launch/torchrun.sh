#!/usr/bin/env bash
# Train a recipe on N local processes (one per GPU, or CPU processes with gloo):
#   launch/torchrun.sh 2 tiny --set parallel.data_parallel_shard=2
# Arguments after N are those of `sparsetron train`. The parallel degrees must multiply to N.
set -euo pipefail
nproc="${1:?usage: launch/torchrun.sh NPROC CONFIG_OR_NAME [--set section.key=value ...] [--resume auto|PATH]}"
shift
exec torchrun --standalone --nproc-per-node "$nproc" -m sparsetron.launch.cli train "$@"
