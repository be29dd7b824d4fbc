#!/usr/bin/env bash
# The first thing to run on any GPU machine: CUDA tests and the throughput figures, in one go.
#
#     tools/gpu/gpu_check.sh OUT            # on the GPU machine, from the repository root (<= 8 minutes)
#     PYTHON=.venv/bin/python tools/gpu/gpu_check.sh OUT --dry-run
#                                       # anywhere: checks the wheels and imports, and runs every part at
#                                       # size T on the CPU (minutes)
#
# The machine's own torch is used; nothing is downloaded. What the GPU image lacks travels as wheels in
# .whl/ (make them first, on a CPU machine: tools/gpu/prepare_gpu_wheels.sh) and is installed into
# /tmp/site. Every part has its own time limit, so one that hangs costs only its share. Results are
# JSON lines in OUT/*.jsonl (one file per part), logs in OUT/*.log, and a short table last
# (tools/gpu/gpu_table.py OUT, also in OUT/table.txt).
set -uo pipefail
OUT=${1:?usage: tools/gpu/gpu_check.sh OUT [--dry-run]}
DRY=${2:-}
cd "$(dirname "$0")/../.."
mkdir -p "$OUT"
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
export PYTHONUNBUFFERED=1

say() { echo "[gpu_check $(date +%T)] $*" | tee -a "$OUT/gpu_check.log"; }

# part NAME SECONDS COMMAND...: JSON lines to OUT/NAME.jsonl, everything else to OUT/NAME.log
part() {
  local name=$1 limit=$2; shift 2
  if [[ $DRY == --dry-run ]]; then  # every flag parsed and every code path run, at a CPU's size
    local small=(--device cpu --batch 2 --warmup 0 --repeats 1 --sizes T)
    [[ $* == *bench_attention* ]] && small=(--device cpu --batch 2 --warmup 0 --repeats 1 --tokens 16 --heads 2)
    say "dry run: $name: $* ${small[*]}"
    "$@" "${small[@]}" > "$OUT/$name.jsonl" 2>> "$OUT/$name.log" || { say "FAILED: $name"; FAILED=1; }
    return
  fi
  say "$name (limit ${limit}s): $*"
  timeout "$limit" "$@" > >(tee "$OUT/$name.raw" | grep '^{' > "$OUT/$name.jsonl") 2> "$OUT/$name.log"
  local status=$?
  [[ $status == 0 ]] || { say "$name ended with status $status (124: its time limit); see $OUT/$name.log"; FAILED=1; }
}

FAILED=0
if [[ $DRY == --dry-run ]]; then  # would the wheels install on the GPU image's Python?
  [[ -f $WHEELS/MANIFEST.txt ]] || { say "error: no $WHEELS/MANIFEST.txt: run tools/gpu/prepare_gpu_wheels.sh first"; exit 2; }
  $PY -m pip install -q --dry-run --no-index --no-deps --target /tmp/gpu-check-dry-run --only-binary=:all: \
    --python-version "${PYTHON_VERSION:-3.12}" --implementation cp --platform manylinux2014_x86_64 \
    "$WHEELS"/*.whl >> "$OUT/gpu_check.log" 2>&1 || { say "FAILED: the wheels would not install"; FAILED=1; }
  say "dry run: $(wc -l < "$WHEELS/MANIFEST.txt") wheels would install for Python ${PYTHON_VERSION:-3.12}"
elif ! $PY -c "import deepspeed, diffusers, webdataset" 2> /dev/null; then
  [[ -f $WHEELS/MANIFEST.txt ]] || { say "error: no $WHEELS/MANIFEST.txt: run tools/gpu/prepare_gpu_wheels.sh first"; exit 2; }
  say "installing $(wc -l < "$WHEELS/MANIFEST.txt") wheels from $WHEELS into /tmp/site"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl >> "$OUT/gpu_check.log" 2>&1 || { say "error: the wheels did not install"; exit 2; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY - <<'PY' 2>&1 | tee "$OUT/environment.txt"
import deepspeed, diffusers, torch, webdataset
import mdt.cli, mdt.train.loop  # the project imports with these versions
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and
      torch.cuda.get_device_name(), "deepspeed", deepspeed.__version__, "diffusers", diffusers.__version__)
try:
    import xformers
    print("xformers", xformers.__version__)
except ImportError:
    print("xformers not installed")
PY
[[ ${PIPESTATUS[0]} == 0 ]] || { say "error: the project does not import here"; exit 2; }

XL=(--device cuda --precision bf16 --sizes XL)
if [[ $DRY == --dry-run ]]; then
  say "dry run: tests/test_cuda.py collects"
  $PY -m pytest -q --collect-only tests/test_cuda.py >> "$OUT/gpu_check.log" 2>&1 || FAILED=1
else
  say "tests/test_cuda.py (limit 150s)"
  timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$OUT/test_cuda.log" 2>&1 || FAILED=1
  tail -n 3 "$OUT/test_cuda.log" | tee -a "$OUT/gpu_check.log"
fi
part bench_model 60 $PY tools/benchmarks/bench_model.py "${XL[@]}" --batch 32 --families DiT MDTv2 MaskDiT
part train_zero2 120 $PY tools/benchmarks/bench_train.py "${XL[@]}" --batch 32 --families DiT MDTv2 MaskDiT
part train_zero1 45 $PY tools/benchmarks/bench_train.py "${XL[@]}" --batch 32 --families DiT MaskDiT \
  --deepspeed-config deepspeed_configs/zero1.json
part train_compiled 120 $PY tools/benchmarks/bench_train.py "${XL[@]}" --batch 32 --families DiT MaskDiT --compile on
part train_batch64 45 $PY tools/benchmarks/bench_train.py "${XL[@]}" --batch 64 --families DiT MaskDiT
part train_checkpointing 45 $PY tools/benchmarks/bench_train.py "${XL[@]}" --batch 32 --families DiT --activation-checkpointing
part attention 30 $PY tools/benchmarks/bench_attention.py --device cuda --precision bf16
part profile 45 $PY tools/benchmarks/bench_train.py "${XL[@]}" --batch 32 --families DiT --profile 15 --repeats 1

[[ $DRY == --dry-run ]] || $PY tools/gpu/gpu_table.py "$OUT" | tee "$OUT/table.txt"
say "done; failures: $FAILED"
exit $FAILED
