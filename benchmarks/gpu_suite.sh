#!/usr/bin/env bash
# The CUDA checks of benchmarks/RESULTS.md ("On a CUDA GPU"), in one bounded run, each step's output
# saved as it goes so that a run cut off at its limit still reports what it reached:
#
#   bash benchmarks/gpu_suite.sh OUT_DIR [PHASES]     # PHASES: 12 (default), 1 or 2
#
# Phase 1, correctness (the two run side by side: neither is a timing):
#   1-pytest.log     pytest -m gpu: FlexAttention against a float64 reference (forward and every
#                    gradient, head dims 63 and 64, fp32 and bf16, 32x32 and 64x64, windows 3..13),
#                    bf16 compiled training, the fused AdamW on CUDA, the fast backends against dense
#   6-sweep.log      benchmarks/gpu_sweep.py: the paper's DiT-XS/1 placement spec shrunk, end to end
# Phase 2, measurements (one at a time, the GPU to itself):
#   3-train-step.log benchmarks/train_step.py DiT-S/1 32x32 bf16 batch 128, eager then compiled
#   2-attention.log  benchmarks/attention.py --device cuda (32x32 and 64x64 grids)
#   5-eval-cost.log  benchmarks/eval_cost.py --device cuda
#   4-packing.log    benchmarks/gpu_packing.py --device cuda, k = 2 and 4 trials on one GPU
# env.log: GPU, driver, CUDA and torch versions. Each step has its own time limit (seconds below),
# sized from the first run on an H200 (benchmarks/RESULTS.md, section 8): about 13 minutes in all,
# more than one 10-minute device call: where that is the limit, run PHASES=1 and PHASES=2 apart.
set -u
out=${1:?usage: bash benchmarks/gpu_suite.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
phases=${2:-12}
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# Compiled kernels are cached on disk, so later steps reuse what the tests compiled.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/ditsweep-inductor-cache}

step() {  # step NAME LIMIT_S COMMAND...: run it bounded, its output in OUT/NAME.log
  local name=$1 limit=$2 start code
  shift 2
  start=$(date +%s)
  echo "== $name: $* (limit ${limit} s)" | tee "$out/$name.log"
  timeout --kill-after=20 "$limit" "$@" >>"$out/$name.log" 2>&1
  code=$?
  echo "== $name: exit $code after $(($(date +%s) - start)) s" | tee -a "$out/$name.log"
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  nvidia-smi 2>&1 | head -n 4
  "$py" -c 'import torch, sys; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version()); print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))' 2>&1
  "$py" -c 'import triton; print("triton", triton.__version__)' 2>&1
  "$py" -c 'import ray, mlflow, pydantic; print("ray", ray.__version__, "mlflow", mlflow.__version__, "pydantic", pydantic.__version__)' 2>&1
  nproc; free -g | head -n 2
} >"$out/env.log" 2>&1

if [[ $phases == *1* ]]; then
step 1-pytest 230 "$py" -m pytest -m gpu -p no:cacheprovider -q -rA --timeout 200 \
  tests/test_gpu.py tests/test_attention.py tests/test_optim.py &
step 6-sweep 300 "$py" benchmarks/gpu_sweep.py --workdir /tmp/ditsweep-gpu-sweep --steps 500 --timeout 230 &
wait
fi

if [[ $phases == *2* ]]; then
step 3-train-step 120 bash -c "
  $py benchmarks/train_step.py --size DiT-S/1 --image-size 32 --placement head --device cuda --batch-size 128 --steps 10 --warmup 3 &&
  $py benchmarks/train_step.py --size DiT-S/1 --image-size 32 --placement head --device cuda --batch-size 128 --steps 10 --warmup 3 --compile"
step 2-attention 90 "$py" benchmarks/attention.py --device cuda --grids 32 64 --repeats 3 --steps 6 --batch-size 64
step 5-eval-cost 120 "$py" benchmarks/eval_cost.py --device cuda
step 4-packing 180 "$py" benchmarks/gpu_packing.py --device cuda --packed 2 4 --seconds 6 --rounds 1 --warmup 3
fi

grep -h -E "^== |passed|failed|sweep_ok|peak_share|images_per_sec=|step_.*=|op_auto|eval_share=|packed_over_single|best_k|k=[0-9]" \
  "$out"/[1-6]-*.log >"$out/summary.txt" 2>&1
cat "$out/summary.txt"
