#!/usr/bin/env bash
# Train a recipe on N local processes (one per GPU, or CPU processes with gloo):
#   launch/torchrun.sh 2 tiny --set parallel.data_parallel_shard=2
# Arguments after N are those of `sparsetron train`. The parallel degrees must multiply to N.
# SPARSETRON_MAX_RESTARTS=K restarts the group up to K times after a worker fails (it resumes
# from the last complete checkpoint; pass --resume auto).
set -euo pipefail
nproc="${1:?usage: launch/torchrun.sh NPROC CONFIG_OR_NAME [--set section.key=value ...] [--resume auto|PATH]}"
shift
# A fresh rendezvous store per worker generation: a restarted group must not find the dead
# one's keys (see train/distributed.py).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# On SIGTERM/Ctrl-C the ranks finish their step and save; torchrun's default 30 s before
# SIGKILL is too short for a large model's save, hence the longer grace period.
# sparsetron.launch.torchrun is torchrun that prints one line for failed ranks (the first to
# fail) and exits with its status; see launch/cli.py for the statuses.
exec python -m sparsetron.launch.torchrun --standalone --max-restarts "${SPARSETRON_MAX_RESTARTS:-0}" --nproc-per-node "$nproc" --shutdown-timeout "${SPARSETRON_SHUTDOWN_TIMEOUT:-600}" \
    -m sparsetron.launch.cli train "$@"
