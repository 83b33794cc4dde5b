#!/usr/bin/env bash
# The one prepared run on a lent GPU machine (torch + triton + transformers + CUDA; no pydantic, torchao, FastAPI or
# Ray; no network). Prepare here with `bash benchmarks/gpu_prepare.sh` (fills .carry/), then:
#   run(command="bash benchmarks/gpu_session.sh", carry=[".carry"], timeout_s=560)
#
# What it does, in order, under ONE deadline (DEADLINE_S, default 540 s from the script's start):
#   0. installs the carried wheels and the trimmed Ray into $SITE (pip --target, on PYTHONPATH), checks the tree
#      against .carry/MANIFEST (a tree edited after the prepare script is reported, not passed off as its commit),
#      prints versions (torch, triton, transformers, GPU) and checks raytp's engine-path imports;
#   1. kernel_tests  the Triton attention kernel tests (tests/unit/test_attention*.py) on the device, in their own
#                    processes (an illegal memory access is sticky per CUDA context), concurrently with
#      device_tests  tests/device (CUDA graphs == eager, triton == sdpa, int4) in another process;
#   2. kernel_bench  benchmarks/attention_kernel.py --device cuda: kernel == contiguous reference, µs per case;
#   3. c64           benchmarks/engine.py --targets raytp,hf --concurrency 64: raytp vs transformers generate_batch;
#   4. b1_2k         benchmarks/engine.py --targets decode --decode-batches 1 --decode-context 2048 (graphs): tok/s
#                    against the bandwidth roofline (weights + K/V bytes per token);
#   5. c64_sync      step 3's raytp target with --sync-scheduling: async vs sync scheduling at 64 concurrent
#                    (skipped when step 3 wrote nothing);
#   6. app           the whole app (serve.run of build_app, trimmed Ray) over HTTP vs the engine in process, at 1
#                    and 64 concurrent requests (`raytp bench`).
# Each step gets min(its own budget, the time left before the deadline less the summary's reserve) through
# `timeout` (its whole process group: children included); a step that would get less than it needs is skipped,
# with a note. Everything (full pytest tracebacks, a killed child's stderr) goes to ONE log, $OUT/gpu_session.log.
# Per-step results land in a fresh temp dir of this run only; after every step benchmarks/gpu_summary.py writes
# $OUT/gpu_session.json (the issue's keys; null where not measured) and $OUT/gpu_steps.json (every step's status
# and raw results). Nothing committed under benchmarks/results/ is read or copied. Three files come back.
#
# Knobs (environment): STEPS (comma list, default all: a rerun names only what it still needs), DEADLINE_S,
# DEVICE (cuda | cpu), MODEL (engine.py --model; default an 8B-shaped random Llama), APP_MODEL, DTYPE, CONCURRENCY,
# CONTEXT, APP_PROMPTS, TEST_WORKERS (pytest-xdist workers for the kernel tests), KERNEL_ARGS (more arguments for
# attention_kernel.py; --quick on cpu), BUDGET_SCALE, OUT, SITE.
# CPU rehearsal (benchmarks/README.md): DEVICE=cpu MODEL=raytp-tiny-llama APP_MODEL=raytp-tiny-llama CONCURRENCY=16
set -u -o pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$SELF")/.."
export DEVICE=${DEVICE:-cuda}
export DTYPE=${DTYPE:-$([ "$DEVICE" = cpu ] && echo float32 || echo bfloat16)}
export MODEL=${MODEL:-} APP_MODEL=${APP_MODEL:-raytp-llama-0.5b}
export CONCURRENCY=${CONCURRENCY:-64} CONTEXT=${CONTEXT:-2048} APP_PROMPTS=${APP_PROMPTS:-64}
export RUN=${RUN:-}

# the whole-app step, run by step() under its timeout as `bash gpu_session.sh _app`
if [ "${1:-}" = _app ]; then
  # preflight (seconds): the imports serving needs. The carried grpcio-reflection / googleapis-common-protos /
  # opentelemetry-proto check the image's grpcio and protobuf at import
  python3 -c "
import importlib.metadata as m, ray, fastapi, pydantic
print('ray', ray.__version__, *(f'{p} {m.version(p)}' for p in ('fastapi', 'pydantic', 'grpcio', 'protobuf')))
from ray import serve
import raytp.serve.app, raytp.bench.main, ray.dashboard.agent, ray._private.metrics_agent
" || { echo "app preflight failed: a package is missing or its version does not fit (above)"; exit 3; }
  python3 -c "from raytp import tiny_model; print(tiny_model.ensure('$APP_MODEL'))" || exit 3
  # token ids from [10, 400): the presets' tokenizer has 460 ids (raytp/tiny_model.py); the server refuses others
  python3 -m raytp.cli bench --model "$APP_MODEL" --ignore-eos --num-prompts "$APP_PROMPTS" \
    --max-concurrency "1,$CONCURRENCY" --random-input-len 256 --random-output-len 128 --random-range-ratio 0.5 \
    --random-vocab-size 400 --compare "http=raytp:device=$DEVICE,tensor_parallel_size=1,dtype=$DTYPE" \
    --compare "engine=engine:device=$DEVICE,dtype=$DTYPE" --output-dir "$RUN/app" --result-filename app \
    --disable-tqdm
  exit
fi

DEADLINE_S=${DEADLINE_S:-540}
RESERVE_S=25  # kept for stopping Ray and the last summary
STEPS=${STEPS:-kernel_tests,device_tests,kernel_bench,c64,b1_2k,c64_sync,app}
OUT=${OUT:-/tmp/gpu_out}
SITE=${SITE:-/tmp/raytp-site}
TEST_WORKERS=${TEST_WORKERS:-$([ "$DEVICE" = cpu ] && echo 0 || echo 4)}
# on CPU the kernel benchmark runs Triton's interpreter at its rehearsal sizes
KERNEL_ARGS=${KERNEL_ARGS-$([ "$DEVICE" = cpu ] && echo --quick)}
[ "$DEVICE" = cpu ] && export TRITON_INTERPRET=1
BUDGET_SCALE=${BUDGET_SCALE:-1}  # every step's budget and need x this (a CPU rehearsal is slower than the GPU)
mkdir -p "$OUT"
rm -f "$OUT/gpu_session.log" "$OUT/gpu_session.json" "$OUT/gpu_steps.json"  # a rerun's $OUT holds no old result
exec > >(tee "$OUT/gpu_session.log") 2>&1
TEE_PID=$!
RUN=$(mktemp -d /tmp/gpu_run.XXXXXX)  # this run's per-step results, and nothing else
export RUN
touch "$RUN/started"
echo "gpu_session: device=$DEVICE dtype=$DTYPE steps=$STEPS deadline=${DEADLINE_S}s run=$RUN out=$OUT"

want() { [[ ",$STEPS," == *",$1,"* ]]; }
left() { echo $((DEADLINE_S - SECONDS)); }
summary() { python3 benchmarks/gpu_summary.py --run "$RUN" --out "$OUT" "$@"; }

# step NAME BUDGET_S NEED_S CMD...: run CMD under min(BUDGET_S, time left - reserve); skip it when that is under
# NEED_S. Its status goes to $RUN/steps.tsv: name, status, exit code, seconds, limit.
step() {
  local name=$1 budget=$(($2 * BUDGET_SCALE)) need=$(($3 * BUDGET_SCALE)); shift 3
  want "$name" || return 0
  local avail=$(($(left) - RESERVE_S))
  local limit=$((budget < avail ? budget : avail))
  if [ "$limit" -lt "$need" ]; then
    echo "== $name: SKIPPED at ${SECONDS}s: ${avail}s left before the deadline, it needs at least ${need}s"
    printf '%s\tskipped\t\t0\t%s\n' "$name" "$limit" >> "$RUN/steps.tsv"
    return 0
  fi
  echo "== $name: start at ${SECONDS}s, limit ${limit}s: $*"
  local start=$SECONDS rc status
  timeout -k 10 "$limit" "$@"
  rc=$?
  case $rc in 0) status=ok ;; 124 | 137) status=timeout ;; *) status=failed ;; esac
  echo "== $name: $status (exit $rc) after $((SECONDS - start))s"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - start))" "$limit" >> "$RUN/steps.tsv"
}

# 0. set-up: carried wheels and Ray, the tree check, versions, imports
if [ -d .carry/wheels ]; then
  rm -rf "$SITE" && mkdir -p "$SITE"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .carry/wheels/*.whl \
    || echo "pip could not install the carried wheels (above): the steps that import them fail"
  [ -f .carry/ray-trim.tar.xz ] && tar -xJf .carry/ray-trim.tar.xz -C "$SITE"
else
  echo "no .carry/wheels: run benchmarks/gpu_prepare.sh here and carry .carry (steps importing pydantic fail)"
fi
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
export PATH="$SITE/bin:$PATH"
if [ -f .carry/MANIFEST ]; then
  sha256sum --quiet -c .carry/MANIFEST > "$RUN/tree_check.txt" 2>&1
  echo $? > "$RUN/tree_check.rc"
  [ -s "$RUN/tree_check.txt" ] && { echo "the tree differs from what gpu_prepare.sh recorded:"; cat "$RUN/tree_check.txt"; }
fi
[ -f .carry/COMMIT ] && cp .carry/COMMIT "$RUN/commit.json"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
  --format=csv,noheader
python3 - "$RUN/versions.json" <<'EOF'
import importlib.metadata as m
import json
import os
import sys

import torch

device = os.environ["DEVICE"]
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": device if device != "cuda" else
        torch.cuda.get_device_name() if torch.cuda.is_available() else "cuda (torch sees no GPU)"}
for name in ("triton", "transformers", "huggingface-hub", "tokenizers", "numpy", "pydantic", "torchao", "fastapi",
             "ray", "grpcio", "protobuf", "pytest", "pytest-xdist"):
    try:
        info[name] = m.version(name)
    except m.PackageNotFoundError:
        info[name] = None
print(json.dumps(info))
json.dump(info, open(sys.argv[1], "w"))
EOF
python3 -c "import raytp.config, raytp.engine.engine, raytp.gang.local, raytp.gang.attention; print('raytp imports ok')" \
  || echo "raytp's engine path does not import (above): the engine steps will fail"
summary
echo "== set-up done at ${SECONDS}s"

# 1. kernel tests and device tests: separate processes (a sticky CUDA error stays in its own), run side by side;
#    each line of theirs is prefixed with its step's name. Full tracebacks (--tb=long), nothing cut.
PYTEST=(python3 -m pytest -p no:cacheprovider -o addopts= -q -rfEs --tb=long)
# (not test_cpu_decode_kernel.py: raytp's CPU kernel, built with the host's compiler, has nothing to do with the GPU)
mapfile -t KERNEL_TESTS < <(ls tests/unit/test_attention*.py 2>/dev/null | sort -u)
workers=()
[ "$TEST_WORKERS" -gt 0 ] && python3 -c "import xdist" 2>/dev/null && workers=(-n "$TEST_WORKERS")
(step kernel_tests 150 60 "${PYTEST[@]}" "${workers[@]}" --junitxml="$RUN/kernel_tests.xml" "${KERNEL_TESTS[@]}" \
  2>&1 | sed -u 's/^/[kernel_tests] /') &
kernel_pid=$!
(step device_tests 180 60 "${PYTEST[@]}" --junitxml="$RUN/device_tests.xml" tests/device 2>&1 \
  | sed -u 's/^/[device_tests] /') &
wait "$kernel_pid" $!
summary

# 2.-6. the benchmarks, in priority order, one at a time on the device
kernel_out=()
python3 benchmarks/attention_kernel.py --help 2>/dev/null | grep -q -- --output && kernel_out=(--output "$RUN/kernel.json")
# shellcheck disable=SC2086  # KERNEL_ARGS: words
step kernel_bench 90 40 python3 benchmarks/attention_kernel.py --device "$DEVICE" $KERNEL_ARGS "${kernel_out[@]}"
if [ ${#kernel_out[@]} -eq 0 ] && [ -f "$RUN/steps.tsv" ] && grep -q "^kernel_bench" "$RUN/steps.tsv"; then
  # a script without --output writes under benchmarks/results/: taken only if written after this run started
  f=benchmarks/results/attention_kernel_$DEVICE.json
  [ "$f" -nt "$RUN/started" ] && cp "$f" "$RUN/kernel.json"
fi
summary
ENGINE=(python3 benchmarks/engine.py --device "$DEVICE" --dtype "$DTYPE" ${MODEL:+--model "$MODEL"})
step c64 200 120 "${ENGINE[@]}" --targets raytp,hf --concurrency "$CONCURRENCY" --output "$RUN/c64.json"
summary
step b1_2k 100 60 "${ENGINE[@]}" --targets decode --decode-batches 1 --decode-context "$CONTEXT" --decode-tokens 64 \
  --output "$RUN/b1_2k.json"
summary
if [ -f "$RUN/c64.json" ] || ! want c64; then  # its row is a ratio to c64's raytp run: alone it measures nothing
  step c64_sync 120 60 "${ENGINE[@]}" --targets raytp --concurrency "$CONCURRENCY" --sync-scheduling \
    --output "$RUN/c64_sync.json"
elif want c64_sync; then
  echo "== c64_sync: SKIPPED: step c64 wrote no result to compare with"
  printf 'c64_sync\tskipped\t\t0\t\n' >> "$RUN/steps.tsv"
fi
summary
step app 200 120 bash "$SELF" _app
want app && timeout 15 python3 -m ray.scripts.scripts stop --force > /dev/null 2>&1  # Ray's daemons outlive a kill
summary --final
echo "== done at ${SECONDS}s (deadline ${DEADLINE_S}s)"
exec >&- 2>&-
wait "$TEE_PID"
