#!/usr/bin/env bash
# Every GPU figure of issues 11 and 12 in one call of at most 9 minutes, every table under $OUT.
#
#   bash benchmarks/gpu_suite.sh             # on a CUDA machine (one H100/H200)
#   bash benchmarks/gpu_suite.sh --dry-run   # on a CPU: each part at tiny sizes, or skipped where it needs CUDA
#
# Parts, in order, each under `timeout` with its own budget in seconds, so that one hang cannot
# eat the rest (the last part also gets whatever the others left of SUITE_BUDGET, default 540):
#   pytest_gpu     80   pytest -m gpu tests/gpu
#   moe_layer      50   benchmarks/moe_layer.py, the anchor shapes (sparsetron vs transformers, a plain
#                       grouped_mm layer, and megatron-core when installed)
#   moba              80   benchmarks/moba.py --quick --configs 512/3 (S 8K, 32K)
#   doc_attention     70   benchmarks/doc_attention.py (dense document mask vs varlen, 8K and 32K)
#   context_parallel  70   benchmarks/context_parallel.py (each cp rank's MoBA / varlen op beside the
#                          whole op, 32K and 128K, cp 2, 4, 8; the largest cases ~0.5 s a call)
#   ep_overlap        60   benchmarks/ep_overlap.py --device cuda (one GPU: the simulated link on a side
#                          stream, ep 8; each dispatcher's step time and profiled comm ∩ compute / comm)
#   end_to_end       130   benchmarks/end_to_end.py (bench-1b-dense/-moe vs the plain-PyTorch anchor;
#                          was 190: ep_overlap's 60 s came from it, end_to_end shares what it gets)
# A budget can be changed with BUDGET_<part>=seconds (SUITE_TIME_SCALE=K multiplies them all, for a
# dry run on a busy CPU), and SUITE_PARTS="moba end_to_end" runs only
# those parts (a second call that reruns what failed). Each part writes $OUT/<part>.txt (its
# stdout and stderr: the tables, markdown); $OUT/suite.md gets the environment, each part's
# budget, wall time and status. Eight files in all (the device tool returns at most 8). A failing
# part does not stop the next; the script exits 1 if any part failed or timed out, 2 if a
# prerequisite is missing. $OUT defaults to runs/gpu-suite in the checkout.
#
# Prerequisites, checked first: CUDA visible to torch (not for --dry-run); python3 with torch,
# triton, numpy, pyyaml, tokenizers, pytest, transformers (the lent H200 image has these) and
# xxhash (checkpoint checksums, imported with the trainer: carry its wheel, `xxhash==4.1.0`
# below); flash-attn is optional: doc_attention measures it only when importable; and sparsetron
# importable from this checkout: the script puts a link named `sparsetron` to the checkout first
# on PYTHONPATH (DESIGN.md, Environment facts), so no install is needed. The GPU machine reaches
# no registry: a missing package travels as wheels. In the calling session, in the repository
# root (/.whl/ is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl NAME==VERSION
# then call the device tool with carry [".whl"] and `bash benchmarks/gpu_suite.sh` as the command:
# this script installs every .whl/*.whl with `pip install --no-index --no-deps --target` into a
# temporary folder on PYTHONPATH. (flash-attn's wheels exceed the 64 MiB a call may carry.)
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_suite.sh [--dry-run]" >&2; exit 2 ;;
esac
OUT=${OUT:-$REPO/runs/gpu-suite}
mkdir -p "$OUT" || exit 2
SUITE_BUDGET=${SUITE_BUDGET:-540}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
START=$(date +%s)
SUMMARY=$OUT/suite.md
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

note() { echo "$*" | tee -a "$SUMMARY"; }
: >"$SUMMARY"

# ---- parts and their budgets -------------------------------------------------------------------
ALL_PARTS=(pytest_gpu moe_layer moba doc_attention context_parallel ep_overlap end_to_end)
declare -A BUDGET=([pytest_gpu]=80 [moe_layer]=50 [moba]=80 [doc_attention]=70 [context_parallel]=70 [ep_overlap]=60
  [end_to_end]=130)
read -ra PARTS <<<"${SUITE_PARTS:-${ALL_PARTS[*]}}"
for part in "${PARTS[@]}"; do
  [[ -n ${BUDGET[$part]:-} ]] || { note "- SUITE_PARTS: unknown part '$part'; known: ${ALL_PARTS[*]}"; exit 2; }
done
for part in "${PARTS[@]}"; do
  var=BUDGET_$part
  [[ -n ${!var:-} ]] && BUDGET[$part]=${!var}
done
# SUITE_TIME_SCALE=K (a whole number, default 1) multiplies the suite's and every part's budget: a
# dry run on a loaded CPU host must not be held to the GPU run's budgets.
SCALE=${SUITE_TIME_SCALE:-1}
[[ $SCALE =~ ^[1-9][0-9]*$ ]] || { note "- SUITE_TIME_SCALE must be a whole number >= 1, got '$SCALE'"; exit 2; }
SUITE_BUDGET=$((SUITE_BUDGET * SCALE))
for part in "${PARTS[@]}"; do BUDGET[$part]=$((BUDGET[$part] * SCALE)); done

# ---- prerequisites -----------------------------------------------------------------------------
note "# GPU suite, $(date -u '+%Y-%m-%d %H:%M UTC')$( ((DRY)) && echo ', dry run on the CPU')"
note ""
note "Commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown), \`bash benchmarks/gpu_suite.sh $*\`, OUT=$OUT"
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$TMP/site" "$REPO"/.whl/*.whl; then
    export PYTHONPATH="$TMP/site${PYTHONPATH:+:$PYTHONPATH}"
    note "- installed carried wheels: $(cd "$REPO/.whl" && echo *.whl)"
  else
    note "- PREREQUISITE: the carried wheels in .whl/ did not install"; exit 2
  fi
fi
mkdir -p "$TMP/pp" && ln -s "$REPO" "$TMP/pp/sparsetron"
export PYTHONPATH="$TMP/pp${PYTHONPATH:+:$PYTHONPATH}"
# One interpreter start for every check (each start imports torch: seconds).
checks=$("$PY" - "$REPO" <<'PYCHECK' 2>&1
import importlib.util, os, sys
missing = [m for m in ("torch", "triton", "numpy", "yaml", "tokenizers", "pytest", "transformers", "xxhash") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"python modules missing: {' '.join(missing)} (carry them as wheels, see this script's header)")
import sparsetron
import torch
import triton
import transformers
where = os.path.realpath(os.path.dirname(sparsetron.__file__))
if where != os.path.realpath(sys.argv[1]):
    sys.exit(f"python imports sparsetron from {where}, not from this checkout {sys.argv[1]}")
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
versions = f"torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}"
print(f"python {sys.version.split()[0]}, {versions}, {gpu}")
PYCHECK
) || { note "- PREREQUISITE: $checks"; exit 2; }
note "- environment: $checks"
if ((!DRY)); then
  if [[ $checks == *"no CUDA device" ]]; then
    note "- PREREQUISITE: torch sees no CUDA device; on a CPU run \`bash benchmarks/gpu_suite.sh --dry-run\`"; exit 2
  fi
  note "- $(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | head -1)"
fi

# The command of one part given T seconds; empty (with a reason in SKIP) where it cannot run.
part_command() {
  local part=$1 T=$2
  CMD=() SKIP=""
  case $part in
    pytest_gpu)
      if ((DRY)); then SKIP="needs CUDA (tests/gpu is skipped without it)"; else
        CMD=("$PY" -m pytest tests/gpu -m gpu -q -p no:cacheprovider); fi ;;
    moe_layer)
      CMD=("$PY" benchmarks/moe_layer.py)
      ((DRY)) && CMD+=(--device cpu --tokens 64 --dim 32 --experts 4 --top-k 2 --hidden 16) ;;
    moba)
      # No new case after half the time: the one running then still has to finish.
      CMD=("$PY" benchmarks/moba.py --quick --budget $((T / 2)))
      if ((DRY)); then CMD+=(--device cpu --seqs 256 --configs 32/3 --rows 8); else CMD+=(--configs 512/3); fi ;;
    doc_attention)
      CMD=("$PY" benchmarks/doc_attention.py --budget $((T / 2)))
      ((DRY)) && CMD+=(--device cpu --seqs 128 --kv-heads 4,2) ;;
    context_parallel)
      # The op times only (the CPU/gloo half is a CPU measurement, covered by its unit test).
      CMD=("$PY" benchmarks/context_parallel.py --budget $((T / 2)))
      ((DRY)) && CMD+=(--device cpu --quick --parts ops) ;;
    ep_overlap)
      CMD=("$PY" benchmarks/ep_overlap.py --device cuda)
      ((DRY)) && CMD=("$PY" benchmarks/ep_overlap.py --device cpu --parts sim,bytes --tokens 64 --dim 16 --experts 4
        --hidden 8 --top-k 2 --eps 2 --reps 1 --link-gbps 1000) ;;
    end_to_end)
      # end_to_end shares its --budget among its runs; the rest is for start-up and the report.
      CMD=("$PY" benchmarks/end_to_end.py --budget $((T - 15 > 1 ? T - 15 : 1)))
      ((DRY)) && CMD+=(--device cpu --models dense --warmup 1 --steps 1) ;;
  esac
}

declare -A STATUS WALL GRANTED
FAILED=()
for i in "${!PARTS[@]}"; do
  part=${PARTS[$i]}
  left=$((SUITE_BUDGET - ($(date +%s) - START)))
  T=${BUDGET[$part]}
  ((i == ${#PARTS[@]} - 1 || T > left)) && T=$left
  GRANTED[$part]=$T WALL[$part]=0
  part_command "$part" "$T"
  if [[ -n $SKIP ]]; then
    STATUS[$part]="skipped: $SKIP"; echo "skipped: $SKIP" >"$OUT/$part.txt"; continue
  fi
  if ((T < 5)); then
    STATUS[$part]="not run: the suite's $SUITE_BUDGET s were spent"; FAILED+=("$part"); continue
  fi
  echo "== $part (up to $T s): ${CMD[*]}" >&2
  s=$(date +%s)
  timeout -k 10 "$T" "${CMD[@]}" >"$OUT/$part.txt" 2>&1
  rc=$?
  WALL[$part]=$(($(date +%s) - s))
  case $rc in
    0) STATUS[$part]=ok ;;
    124 | 137) STATUS[$part]="TIMEOUT after $T s"; FAILED+=("$part") ;;
    *) STATUS[$part]="FAILED (exit $rc)"; FAILED+=("$part") ;;
  esac
  echo "== $part: ${STATUS[$part]} in ${WALL[$part]} s" >&2
done

# ---- report ---------------------------------------------------------------------------------
for part in "${PARTS[@]}"; do
  echo; echo "## $part ($OUT/$part.txt, last 40 lines)"; tail -n 40 "$OUT/$part.txt" 2>/dev/null
done
note ""
note "| part | budget s | granted s | wall s | status |"
note "|---|---|---|---|---|"
for part in "${PARTS[@]}"; do
  note "| $part | ${BUDGET[$part]} | ${GRANTED[$part]} | ${WALL[$part]} | ${STATUS[$part]} |"
done
note ""
verdict="all parts ok"
((${#FAILED[@]})) && verdict="parts failed or timed out: ${FAILED[*]}"
note "Suite wall time $(($(date +%s) - START)) s of $SUITE_BUDGET; $verdict."
((${#FAILED[@]} == 0))
