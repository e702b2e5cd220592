#!/usr/bin/env bash
# GPU readiness of quest on one CUDA machine, in three stages, under 8 minutes in all:
#   1. install  pip install -e '.[gpu,test]' (faiss-gpu), then check that torch sees CUDA and that
#               faiss has GPU support
#   2. tests    the `gpu` tests (tests/test_gpu.py): a bf16 train step, faiss-gpu k-means vs CPU,
#               uint8 batches normalised on the GPU, one QuEST epoch under `accelerate launch`
#   3. bench    tools/bench_step.py on the ImageNet recipe at 224 px, batch 128, bf16
# Each stage has its own time limit; a failed stage does not stop the next ones, and the summary at
# the end names each stage's outcome. Exit status 0 only when all three passed.
#
#   bash tools/gpu_check.sh               # from the repository root
#   bash tools/gpu_check.sh --no-install  # the environment is ready (no network): skip pip
#
# The log of each stage is kept in $QUEST_GPU_CHECK_LOGS (default: a new temporary folder).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
INSTALL=1
for arg in "$@"; do
  case "$arg" in
    --no-install) INSTALL=0 ;;
    -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

# Seconds per stage: 190 + 150 + 110 = 450 s (+ 5 s each to kill a stage that ignores the limit).
INSTALL_S=190
TESTS_S=150
BENCH_S=110
LOGS="${QUEST_GPU_CHECK_LOGS:-$(mktemp -d -t quest-gpu-check.XXXXXX)}"
mkdir -p "$LOGS"
export WANDB_MODE=disabled
export QUEST_GPU_CHECK=1 # the gpu tests fail instead of skipping when a piece is missing
T0=$SECONDS
declare -a NAMES=() RESULTS=() TIMES=()

# stage NAME LIMIT_S COMMAND...: run COMMAND under `timeout`, teeing its output to $LOGS/NAME.log.
stage() {
  local name=$1 limit=$2 start=$SECONDS rc=0
  shift 2
  echo
  echo "=== $name (limit ${limit} s): $*"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log" || rc=$?
  local result=PASS
  if ((rc == 124 || rc == 137)); then
    result="TIMEOUT after ${limit} s"
  elif ((rc != 0)); then
    result="FAIL (exit $rc)"
  fi
  NAMES+=("$name")
  RESULTS+=("$result")
  TIMES+=("$((SECONDS - start))")
  echo "=== $name: $result"
}

install() {
  if python -m pip show faiss-cpu >/dev/null 2>&1; then
    # faiss-cpu and faiss-gpu install the same `faiss` package: one would clobber the other.
    echo "faiss-cpu is installed: removing it (and any faiss-gpu it overwrote) before faiss-gpu"
    python -m pip uninstall -y faiss-cpu faiss-gpu
  fi
  python -m pip install -e '.[gpu,test]'
}

ready() {
  python - <<'EOF'
import torch

assert torch.cuda.is_available(), "torch sees no CUDA device"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}: {torch.cuda.get_device_name(0)}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
import faiss

assert hasattr(faiss, "StandardGpuResources"), f"faiss {faiss.__version__} has no GPU support"
assert faiss.get_num_gpus() > 0, f"faiss {faiss.__version__} sees no GPU"
print(f"faiss {faiss.__version__}: {faiss.get_num_gpus()} GPU(s)")
EOF
}

install_stage() {
  if ((INSTALL)); then install; else echo "--no-install: pip skipped"; fi
  ready
}

export INSTALL
export -f install ready install_stage
stage install "$INSTALL_S" bash -c 'set -euo pipefail; install_stage'
stage tests "$TESTS_S" python -m pytest -q -m gpu tests/test_gpu.py -rs --durations=5
if [[ ${RESULTS[-1]} == PASS ]] && grep -Eq '[0-9]+ skipped' "$LOGS/tests.log"; then
  RESULTS[-1]="FAIL (tests skipped)" # on a GPU machine every gpu test must run
fi
stage bench "$BENCH_S" python tools/bench_step.py recipes/imagenet_rn34_rn18.toml run.precision=bf16 --size 224 --batch 128

echo
echo "=================== quest GPU check: summary ==================="
python -c 'import torch; print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")' 2>/dev/null || true
failed=0
for i in "${!NAMES[@]}"; do
  printf '%-8s %-24s %4s s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${TIMES[$i]}"
  [[ ${RESULTS[$i]} == PASS ]] || failed=1
done
echo "tests:   $(grep -E '[0-9]+ (passed|failed|skipped|errors?)' "$LOGS/tests.log" | tail -1 || echo 'no pytest summary')"
echo "bench:"
grep -E '^(config|original|quest) |quest default path|QuEST part|k-means|quest/reference' "$LOGS/bench.log" |
  sed 's/^/  /' || echo "  no benchmark lines"
echo "total:   $((SECONDS - T0)) s; logs in $LOGS"
if ((failed)); then
  echo "GPU check: FAILED"
  exit 1
fi
echo "GPU check: all three stages passed"
