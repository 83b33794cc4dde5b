"""A Ray small enough to travel where Ray is not installed (the lent GPU machines take 64 MiB per call), that
`serve run` still works with: the installed ray package, or a Ray wheel for another Python, minus what serving
never imports.

    python deploy/trim_ray.py --out ray-trim.tar.xz                       # from this environment's ray
    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 ray==2.60.0
    python deploy/trim_ray.py --wheel ray-2.60.0-cp312-*.whl --out ray-trim.tar.xz   # for a Python 3.12 machine

Unpack it and put the folder first on PYTHONPATH (``tar -xJf ray-trim.tar.xz -C /tmp/ray && PYTHONPATH=/tmp/ray``).
What is removed, and why that is safe for serving:
  ray/jars                  Java workers (33 MB): raytp starts Python actors only.
  ray/dashboard/client      the web UI's built JavaScript (9 MB); replaced by an empty page, because the dashboard
                            head process (which Serve's controller and `serve` CLI talk to) refuses to start
                            without the folder. Its REST API stays.
  ray/rllib, tune, train, data, llm, workflow
                            libraries serving does not import (ray.serve imports none of them; checked by the
                            test, which serves a request with the trimmed copy).
  __pycache__               rebuilt on first import.
  debug symbols             `strip --strip-unneeded` on _raylet.so, gcs_server and raylet (~36 MB): symbols only
                            serve debuggers and stack symbolization; the code is unchanged.
Python packages Ray needs (fastapi, uvicorn, pydantic, aiohttp, grpcio, ...) are not included: carry as wheels
the ones the target machine lacks.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

REMOVED = ("jars", "dashboard/client", "rllib", "tune", "train", "data", "llm", "workflow")
BINARIES = ("_raylet.so", "core/src/ray/gcs/gcs_server", "core/src/ray/raylet/raylet")


def trim(ray_dir: str, strip: bool = True) -> None:
    """Trim the ``ray`` package folder ``ray_dir`` in place."""
    for rel in REMOVED:
        shutil.rmtree(os.path.join(ray_dir, rel), ignore_errors=True)
    build = os.path.join(ray_dir, "dashboard", "client", "build")
    os.makedirs(os.path.join(build, "static"))
    with open(os.path.join(build, "index.html"), "w") as f:
        f.write("<!doctype html><title>Ray</title><p>Trimmed Ray (raytp deploy/trim_ray.py): no dashboard UI.\n")
    for root, dirs, _ in os.walk(ray_dir):
        for d in [d for d in dirs if d == "__pycache__"]:
            shutil.rmtree(os.path.join(root, d))
            dirs.remove(d)
    if strip and shutil.which("strip"):
        for rel in BINARIES:
            path = os.path.join(ray_dir, rel)
            if os.path.exists(path):
                subprocess.run(["strip", "--strip-unneeded", path], check=True)


def installed_ray() -> str:
    import importlib.util

    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("ray is not installed here; give --wheel")
    return list(spec.submodule_search_locations)[0]


def build(dest: str, wheel: str | None, strip: bool = True) -> str:
    """A trimmed copy of Ray under ``dest`` (``dest/ray``, and its dist-info from a wheel); returns ``dest``."""
    if wheel:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(dest)
        for name in os.listdir(dest):  # keep ray/ and its metadata; drop the wheel's scripts and data
            if name != "ray" and not name.endswith(".dist-info"):
                shutil.rmtree(os.path.join(dest, name), ignore_errors=True)
        for root, _, files in os.walk(os.path.join(dest, "ray", "core", "src")):
            for f in files:  # zip extraction loses the executable bit
                os.chmod(os.path.join(root, f), 0o755)
    else:
        shutil.copytree(installed_ray(), os.path.join(dest, "ray"), symlinks=True)
    trim(os.path.join(dest, "ray"), strip)
    return dest


def size_mb(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", help="a Ray wheel (default: this environment's installed ray)")
    ap.add_argument("--out", help="the .tar.xz to write")
    ap.add_argument("--tree", help="write the trimmed folder here instead of an archive")
    ap.add_argument("--no-strip", action="store_true")
    args = ap.parse_args()
    if bool(args.out) == bool(args.tree):
        sys.exit("give one of --out or --tree")
    if args.tree:
        build(args.tree, args.wheel, not args.no_strip)
        print(f"{args.tree}: {size_mb(args.tree):.1f} MB")
        return
    with tempfile.TemporaryDirectory() as tmp:
        build(tmp, args.wheel, not args.no_strip)
        with tarfile.open(args.out, "w:xz", preset=6) as tar:
            for name in sorted(os.listdir(tmp)):
                tar.add(os.path.join(tmp, name), arcname=name)
        print(f"{args.out}: {os.path.getsize(args.out) / 2**20:.1f} MiB ({size_mb(tmp):.1f} MB unpacked)")


if __name__ == "__main__":
    main()
