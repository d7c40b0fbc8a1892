#!/usr/bin/env bash
# The GPU machine's checks and benchmarks, in stages, each with a time limit, logs under $OUT:
#   bash benchmarks/device_suite.sh kernel-tests kernel-bench moe model-tests engine-quick engine gpu-tests
# Run from the repository root with .devbundle and .whl carried (benchmarks/device_env.sh sets up the paths).
set -uo pipefail
source benchmarks/device_env.sh
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm --format=csv > "$OUT/gpu.txt" 2>&1
export DSV4_KERNEL_CACHE=/tmp/dsv4-kernels TRITON_CACHE_DIR=/tmp/triton-cache
run() {   # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T), limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc"; tail -n 25 "$OUT/$name.log"
}
for stage in "$@"; do
  case $stage in
    kernel-tests) run kernel-tests 300 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 150 -rf \
        tests/gpu/test_fast_linear_gpu.py tests/gpu/test_fast_moe_gpu.py tests/gpu/test_fast_attention_gpu.py \
        tests/gpu/test_fast_indexer_gpu.py tests/gpu/test_fast_compressor_gpu.py tests/gpu/test_fast_router_gpu.py \
        tests/gpu/test_fast_mhc_gpu.py tests/gpu/test_fast_norm_gpu.py tests/gpu/test_sampler_device.py ;;
    kernel-tests-split)   # one process per file: a CUDA fault in one cannot fail the others
      for f in ${FILES:-linear moe attention indexer compressor router mhc norm}; do
        run "gpu-$f" 120 env CUDA_LAUNCH_BLOCKING=1 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 100 -rf \
          "tests/gpu/test_fast_${f}_gpu.py"
      done
      run gpu-sampler 60 python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/gpu/test_sampler_device.py ;;
    kernel-bench) run kernel-bench 300 python3 benchmarks/fast_kernels.py --out "$OUT" ;;
    moe)   # the routed-expert kernels alone: their GPU tests, their benchmark rows, the launch-geometry sweep
      run moe-tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 100 -rf tests/gpu/test_fast_moe_gpu.py
      run moe-bench 150 python3 benchmarks/fast_cases_moe.py --out "$OUT"
      run moe-tilings 200 python3 benchmarks/fast_cases_moe.py --tilings --out "$OUT" ;;
    model-tests) run model-tests 280 python3 -m pytest -q -m gpu -s -p no:cacheprovider tests/gpu/test_model_fast_gpu.py \
        tests/gpu/test_runner_graphs.py ;;
    ablation) run ablation 400 python3 benchmarks/fast_ablation.py ;;   # which fast family departs from its twin
    engine-quick) run engine-quick 200 python3 benchmarks/engine.py --layers 4 --batches 1,64 --long-context 0 \
        --prefill 2048 --reference-layers 0 --hf-layers 0 --out "$OUT" ;;
    engine) run engine 420 python3 benchmarks/engine.py --out "$OUT" ;;
    gpu-tests) run gpu-tests 540 python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu ;;
    *) echo "unknown stage $stage" ;;
  esac
done
