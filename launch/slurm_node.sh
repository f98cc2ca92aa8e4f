#!/usr/bin/env bash
# One task of launch/slurm.sbatch (one per node): torchrun for this node's ranks.
#   slurm_node.sh HEAD:PORT NPROC_PER_NODE MAX_RESTARTS LOG_DIR JOB_LOG CONFIG_OR_NAME [--set K=V ...]
#
# SIGUSR1 (preemption or the time-limit warning, forwarded by the batch shell through srun) must
# reach the ranks, which then finish their step, save and exit 0, and torchrun with them. torchrun
# itself dies of SIGUSR1 (its default action) and turns SIGTERM into a failure, so torchrun is
# started with SIGUSR1 ignored, and this script forwards the signal to torchrun's children, the
# ranks. They inherit the ignore too, until the trainer installs its own handler for the training
# loop; a signal that comes while a rank is still starting is therefore not lost but resent here
# every second until torchrun exits. (srun passes a signal on to every process of the step, as
# seen with proctrack/linuxproc: torchrun ignores it, the ranks take it, so both ways end the same.)
# torchrun runs as sparsetron.launch.torchrun, which ends a failed job with one `error:` line, that
# of the rank that failed first, and exits with its status (launch/cli.py lists the statuses).
set -uo pipefail
endpoint="$1" nproc="$2" restarts="$3" log_dir="$4" job_log="$5"
shift 5
python="${SPARSETRON_PYTHON:-python}"
task="${SLURM_PROCID:-0}"
log() { echo "$(date '+%F %T') sparsetron-slurm task $task on $(hostname -s): $*" | tee -a "$job_log"; }

mkdir -p "$log_dir/task$task"
trap '' USR1
"$python" -m sparsetron.launch.torchrun \
    --nnodes "${SLURM_NTASKS:-1}" --nproc-per-node "$nproc" --max-restarts "$restarts" \
    --rdzv-backend c10d --rdzv-endpoint "$endpoint" --rdzv-id "sparsetron-${SLURM_JOB_ID:-0}" \
    --log-dir "$log_dir/task$task" --redirects 3 --tee 3 \
    --shutdown-timeout "${SPARSETRON_SHUTDOWN_TIMEOUT:-600}" \
    -m sparsetron.launch.cli train "$@" --resume auto &
torchrun=$!
stopping=0
trap 'stopping=1' USR1

forwarded=""
while kill -0 "$torchrun" 2>/dev/null; do
    if ((stopping)); then
        # torchrun's children are its ranks (procps' pgrep -P where the kernel lacks the list).
        ranks="$(cat /proc/"$torchrun"/task/*/children 2>/dev/null || pgrep -P "$torchrun" | tr '\n' ' ')"
        if [[ -n "${ranks// /}" ]]; then
            # shellcheck disable=SC2086  # one pid per word
            kill -USR1 $ranks 2>/dev/null
            if [[ "$ranks" != "$forwarded" ]]; then
                log "forwarded SIGUSR1 to the ranks of torchrun $torchrun (pids ${ranks% })"
                forwarded="$ranks"
            fi
        fi
    fi
    sleep 1 &
    wait $! # returns early on the signal; a foreground sleep would hold the trap back
done
wait "$torchrun"
status=$?
log "torchrun exited with status $status"
exit "$status"
