#!/usr/bin/env bash
# One prepared run on a lent CUDA machine (torch + transformers + CUDA, no Ray, no network): the device tests,
# the attention kernel microbenchmark, then the engine benchmarks on an 8B-shaped random Llama (triton and sdpa
# attention backends; the decode targets use the default, auto = triton where it is installed). Wheels that machine lacks
# (torchao, pydantic) travel in .whl/ (see /work/.library/device/README.md); results land in $OUT.
set -u
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, torchao; print('torch', torch.__version__, 'transformers', transformers.__version__, 'torchao', torchao.__version__)" 2>&1 | grep -v "Failed to load"
STEPS=${STEPS:-pytest,kernel,eager,graphs,sync,c64,c64sdpa,int4}  # a rerun can name only what it still needs
want() { [[ ",$STEPS," == *",$1,"* ]]; }
want pytest && timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/device tests/unit/test_attention_backends.py 2>&1 | tail -15 | tee "$OUT/pytest.log"
want kernel && timeout 120 python3 benchmarks/attention_kernel.py --device cuda 2>&1 | tail -8 && cp benchmarks/results/attention_kernel_cuda.* "$OUT/"
B="python3 benchmarks/engine.py --device cuda --dtype bfloat16"
run() { local name=$1; shift; echo "== $name"; timeout "$@" --output "$name" 2>&1 | grep -v "Failed to load" | tail -4; cp "benchmarks/results/$name.json" "$OUT/" 2>/dev/null; }
want eager && run cuda_decode_bf16_eager 150 $B --targets decode --enforce-eager
want graphs && run cuda_decode_bf16_graphs 150 $B --targets decode
want sync && run cuda_decode_bf16_graphs_sync 150 $B --targets decode --sync-scheduling  # async scheduling's share
want c64 && run cuda_engine_c64 300 $B --targets raytp,hf --concurrency 64 --attention-backend triton
want c64sdpa && run cuda_engine_c64_sdpa 200 $B --targets raytp --concurrency 64 --attention-backend sdpa
want int4 && run cuda_decode_int4_graphs 200 $B --targets decode --quantization int4
