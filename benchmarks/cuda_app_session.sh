#!/usr/bin/env bash
# The whole app on a lent GPU machine (issue 19): the trimmed Ray and the missing wheels from .carry/ (made here by
# benchmarks/cuda_app_prepare.sh), then `raytp bench` drives the same seeded workload, at 1 and at 64 concurrent
# requests, through (1) the Serve app over HTTP (serve.run of build_app: ingress → server replica → gang of one
# CUDA rank) and (2) raytp's engine in process (no Ray, no Serve), in one run; its report has HTTP / in-process.
#   run(command="bash benchmarks/cuda_app_session.sh", carry=[".carry"], timeout_s=540)
# DEVICE=cpu MODEL=raytp-tiny-llama rehearses it on a CPU machine with a bare Python (see the prepare script).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-raytp-llama-0.5b}
PROMPTS=${PROMPTS:-128}
SITE=${SITE:-/tmp/raytp-site}
rm -rf "$SITE" && mkdir -p "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .carry/wheels/*.whl
tar -xJf .carry/ray-trim.tar.xz -C "$SITE"
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
export PATH="$SITE/bin:$PATH"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# preflight (seconds, not minutes of device time): versions, and the imports serving needs. The carried
# grpcio-reflection / googleapis-common-protos / opentelemetry-proto check the image's grpcio and protobuf at import
python3 -c "
import sys, importlib.metadata as m, ray, torch, transformers, fastapi, pydantic
print('python', sys.version.split()[0], 'ray', ray.__version__, 'torch', torch.__version__, 'transformers',
      transformers.__version__, *(f'{p} {m.version(p)}' for p in ('grpcio', 'protobuf', 'huggingface-hub')))
from ray import serve
import raytp.serve.app, raytp.bench.main, ray.dashboard.agent, ray._private.metrics_agent
" || { echo "preflight failed: a package is missing or its version does not fit (see above)"; exit 1; }
# the checkpoint is generated once, before either target starts (a random-weight preset, raytp/tiny_model.py)
python3 -c "from raytp import tiny_model; print(tiny_model.ensure('$MODEL'))"
# token ids from [10, 400): both presets' tokenizer has 460 ids (raytp/tiny_model.py); the server refuses others
DTYPE=$([ "$DEVICE" = cpu ] && echo float32 || echo bfloat16)
timeout 480 python3 -m raytp.cli bench --model "$MODEL" --ignore-eos --num-prompts "$PROMPTS" --max-concurrency 1,64 \
  --random-input-len 256 --random-output-len 128 --random-range-ratio 0.5 --random-vocab-size 400 \
  --compare "http=raytp:device=$DEVICE,tensor_parallel_size=1,dtype=$DTYPE" \
  --compare "engine=engine:device=$DEVICE,dtype=$DTYPE" \
  --output-dir "$OUT" --result-filename "app_$DEVICE" --disable-tqdm 2>&1 | grep -v "Failed to load\|^W1"
ls "$OUT"
