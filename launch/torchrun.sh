#!/usr/bin/env bash
# Train a recipe on N local processes (one per GPU, or CPU processes with gloo):
#   launch/torchrun.sh 2 tiny --set parallel.data_parallel_shard=2
# Arguments after N are those of `sparsetron train`. The parallel degrees must multiply to N.
set -euo pipefail
nproc="${1:?usage: launch/torchrun.sh NPROC CONFIG_OR_NAME [--set section.key=value ...] [--resume auto|PATH]}"
shift
# On SIGTERM/Ctrl-C the ranks finish their step and save; torchrun's default 30 s before
# SIGKILL is too short for a large model's save, hence the longer grace period.
exec torchrun --standalone --nproc-per-node "$nproc" --shutdown-timeout "${SPARSETRON_SHUTDOWN_TIMEOUT:-600}" \
    -m sparsetron.launch.cli train "$@"
