#!/usr/bin/env bash
# Batch-1 decode of the direct gang (benchmarks/decode.py's TP=1 bf16 configuration, 0.5B, 48 tokens) at this
# checkout and at an earlier commit, alternating in one run (this host's speed drifts): prints one RESULT line per
# run, labelled. Usage: bash benchmarks/compare_decode.sh REF [ROUNDS]
set -eu
cd "$(dirname "$0")/.."
REF=$1; ROUNDS=${2:-3}
OLD=/tmp/raytp-$REF
[ -d "$OLD" ] || git worktree add --detach "$OLD" "$REF" >/dev/null
PY=${PY:-.venv/bin/python}
SPEC='{"model": "raytp-llama-0.5b", "tp": 1, "dtype": "bfloat16", "cpus": 2, "format": {}, "batches": [1, 16], "new_tokens": 48}'
for i in $(seq "$ROUNDS"); do
  echo "now $(PYTHONPATH=$PWD $PY benchmarks/decode.py --one "$SPEC" 2>/dev/null | grep RESULT)"
  # from inside the worktree: Ray puts the driver's working directory first on its workers' path
  echo "$REF $(cd "$OLD" && PYTHONPATH=$OLD "$OLDPWD/$PY" benchmarks/decode.py --one "$SPEC" 2>/dev/null | grep RESULT)"
done
