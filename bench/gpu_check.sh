#!/usr/bin/env bash
# neti-fast's GPU check: the first thing to run on a machine with one NVIDIA GPU and this repository.
#
#   bash bench/gpu_check.sh            # results in bench/results/gpu-<device>-<date>/
#
# 1. installs what is missing (from ./.whl/*.whl when that folder exists: machines without network;
#    else from the package index), without touching an installed CUDA torch;
# 2. environment: GPU, driver, CUDA, library versions -> env.json;
# 3. the GPU tests: compiled Triton kernel (full SD 1.5 shapes), the dispatcher's checks, compile +
#    CUDA graphs, fp16 / bf16, ONNX Runtime CUDA, TensorRT where it imports -> tests.log;
# 4. the Triton compile check on this GPU's own arch (same report as CI's) -> kernel-check.txt;
# 5. the attention micro-benchmark with the tile-size sweep, SD 1.x and SDXL shapes -> attention.json;
# 6. the bench ladder on sd15-shaped at 512x512, batch 1 / 4 / 16, 50 steps, fp16 -> ladder.json/png.
# Each stage has its own time limit (GPU_CHECK_BUDGET_S, default 540 s in all, shared in order);
# a stage that fails is recorded and the next one runs. Exit status: 1 if any stage failed.
# GPU_CHECK_RUNGS overrides the ladder's rungs (default: no onnx / tensorrt, whose SD 1.5 export and
# engine build alone take minutes; set GPU_CHECK_RUNGS=all for every rung).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET_S:-540}
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to $PY's torch; nothing to check here (the CPU suite is .ci/run)" >&2
  exit 2
fi
dev=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
OUT=${GPU_CHECK_OUT:-bench/results/gpu-${dev}-$(date -u +%Y%m%d)}
mkdir -p "$OUT"
failed=()
stage() {  # stage NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, record failure
  local name=$1 secs=$2; shift 2
  local l; l=$(left); (( secs > l )) && secs=$l
  if (( secs < 20 )); then echo "== $name: skipped, budget spent"; failed+=("$name(no time)"); return; fi
  echo "== $name (limit ${secs}s)"
  timeout --signal=INT --kill-after=15 "$secs" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  (( rc == 0 )) || { echo "== $name: FAILED (exit $rc)"; failed+=("$name"); }
}

# 1. install: never replace the machine's CUDA torch (no torch pin here)
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/neti-site .whl/*.whl && export PYTHONPATH=/tmp/neti-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import diffusers, transformers, safetensors" 2>/dev/null || $PY -m pip install -q diffusers transformers safetensors
$PY -c "import neti_fast" 2>/dev/null || $PY -m pip install -q --no-deps --no-build-isolation -e . \
  || export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# 2. environment
$PY - <<'PYEOF' > "$OUT/env.json"
import json, platform, subprocess, importlib, datetime, torch
def ver(m):
    try:
        return importlib.import_module(m).__version__
    except Exception as e:  # noqa: BLE001
        return None
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
print(json.dumps({"date_utc": datetime.datetime.utcnow().isoformat(timespec="seconds"), "gpu": torch.cuda.get_device_name(),
                  "capability": torch.cuda.get_device_capability(), "nvidia_smi": smi, "cuda": torch.version.cuda,
                  "python": platform.python_version(), **{m: ver(m) for m in
                  ("torch", "triton", "diffusers", "transformers", "onnxruntime", "tensorrt", "xformers")}}, indent=1))
PYEOF
cat "$OUT/env.json"

# 3. GPU tests (the CPU-only parts of these files run too; they are quick)
stage tests 240 $PY -m pytest -q -x -p no:cacheprovider tests/kernels tests/sd/test_attention.py tests/sd/test_native.py \
  tests/engine/test_cudagraph.py tests/engine/test_lowp.py tests/export/test_export.py -k "cuda or tensorrt or triton or graph or fp16 or bf16"
# 4. compile check for this GPU's arch
arch=$($PY -c "import torch; a, b = torch.cuda.get_device_capability(); print(a * 10 + b)")
stage kernel-check 60 $PY -m neti_fast.kernels.check --archs "$arch"
cp "$OUT/kernel-check.log" "$OUT/kernel-check.txt" 2>/dev/null
# 5. attention micro-benchmark + tile sweep, at SD 1.x's and SDXL's shapes (kernels/shapes.py)
stage attention 90 $PY -m neti_fast.bench.attention --families sd1 sdxl --sweep-configs --json "$OUT/attention.json"
# 6. the ladder
rungs=${GPU_CHECK_RUNGS:-reference diffusers batched concepts triton compile}
[ "$rungs" = all ] && rungs=""
stage ladder 400 $PY -m neti_fast bench --model sd15-shaped --height 512 --width 512 --steps 50 \
  --batch-sizes 1 4 16 --dtype fp16 --repeats 2 ${rungs:+--rungs $rungs} \
  --json "$OUT/ladder.json" --chart "$OUT/ladder.png"

echo "results in $OUT (took $(( $(date +%s) - start )) s)"
if (( ${#failed[@]} )); then echo "FAILED stages: ${failed[*]}"; exit 1; fi
echo "all stages passed"
