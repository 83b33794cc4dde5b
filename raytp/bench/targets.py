"""What a ``--compare`` entry names, and how it is brought up and torn down.

``NAME=http://host:port``   an OpenAI-compatible server that is already running (raytp or any other)
``NAME=raytp:k=v,...``      raytp started here for this target only (``serve.run`` on a local Ray), with
                             these config overrides of ``--model`` (e.g. ``raytp:tensor_parallel_size=2``)
``NAME=transformers:k=v``   the in-process transformers baseline, one request at a time (``dtype=``)
``NAME=transformers-serve:k=v``  ``transformers serve --continuous-batching`` started here on the same checkpoint
                             (``dtype=``): transformers' own OpenAI server with its continuous batching
``NAME=engine:k=v,...``     raytp's engine in this process with these config overrides (TP=1, no Ray, no Serve):
                             what the same requests cost without the Serve path
``NAME=vllm:k=v``           vLLM's OpenAI server started here on the same checkpoint, from its own virtual
                             environment (``venv=``, default .venv-vllm; ``dtype=``, ``kv_cache_gb=`` for
                             VLLM_CPU_KVCACHE_SPACE, default 4): the peer a CPU user would pick instead
                             (``bash ../shared/peers/vllm-cpu.sh install`` makes that venv)
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import yaml

from raytp.bench.clients import EngineClient, HTTPClient, TransformersClient


@dataclass(frozen=True)
class Target:
    name: str
    kind: str  # url | raytp | transformers | transformers-serve | engine
    url: str = ""
    options: tuple[tuple[str, object], ...] = ()


def parse(spec: str) -> Target:
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--compare takes NAME=URL, NAME=raytp[:k=v,...] or NAME=transformers[:k=v], not {spec!r}")
    if rest.startswith(("http://", "https://")):
        return Target(name, "url", url=rest)
    kind, _, opts = rest.partition(":")
    if kind not in ("raytp", "transformers", "transformers-serve", "engine", "vllm"):
        raise ValueError(f"--compare {spec!r}: unknown target kind {kind!r}")
    options = []
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--compare {spec!r}: option {item!r} is not key=value")
        options.append((key, yaml.safe_load(value)))  # "2" -> 2, "true" -> True, "bfloat16" stays text
    return Target(name, kind, options=tuple(options))


def model_path(model: str) -> str | None:
    """A local checkpoint directory for ``model`` (a raytp preset is generated on first use), else None."""
    from raytp import tiny_model

    if model in tiny_model.PRESETS:
        return tiny_model.ensure(model)
    return model if os.path.isdir(model) else None


@contextlib.asynccontextmanager
async def open_target(target: Target, *, model: str, ignore_eos: bool, api_key: str | None, port: int):
    """Yield ``(client, tp_size)`` for ``target``; started targets are stopped on exit."""
    opts = dict(target.options)
    if target.kind == "url":
        async with HTTPClient(target.url, model, ignore_eos, api_key) as client:
            yield client, await _tp_of(target.url, api_key)
    elif target.kind == "transformers":
        path = model_path(model)
        if path is None:
            raise ValueError(f"the transformers baseline needs a local checkpoint or raytp preset, not {model!r}")
        async with TransformersClient(path, str(opts.get("dtype", "bfloat16")), ignore_eos, opts.get("threads")) as c:
            yield c, 1
    elif target.kind == "engine":
        async with EngineClient({"model": model, **_cpu_threads(opts, 1)}, ignore_eos) as client:
            yield client, 1
    elif target.kind in ("transformers-serve", "vllm"):
        path = model_path(model)
        if path is None:
            raise ValueError(f"{target.kind} needs a local checkpoint or raytp preset, not {model!r}")
        from transformers import AutoTokenizer

        if target.kind == "vllm":  # token-id prompts, ignore_eos and usage as raytp takes them
            cmd, env, tokenizer = _vllm_command(path, opts, port), {
                "VLLM_CPU_KVCACHE_SPACE": str(opts.get("kv_cache_gb", 4))}, None
        else:  # text prompts only, no usage: prompts decoded, chunks counted
            cmd, env, tokenizer = _transformers_serve_command(opts, port), {}, AutoTokenizer.from_pretrained(path)
        with _server(cmd, env, port):
            async with HTTPClient(f"http://127.0.0.1:{port}", path, ignore_eos, tokenizer=tokenizer) as client:
                yield client, 1
    else:
        with _raytp_app(model, opts, port):
            async with HTTPClient(f"http://127.0.0.1:{port}", model, ignore_eos) as client:
                yield client, int(opts.get("tensor_parallel_size", 1))


async def _tp_of(url: str, api_key: str | None) -> int:
    """raytp's /health names its TP size; other servers count as 1."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.get(url.rstrip("/") + "/health",
                               headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
            return int(r.json().get("tensor_parallel_size", 1))
    except Exception:  # noqa: BLE001 - not raytp, or no /health
        return 1


def _transformers_serve_command(opts: dict, port: int) -> list[str]:
    """``transformers serve --continuous-batching`` (it loads the request's model on first use)."""
    import shutil
    import sys

    exe = shutil.which("transformers") or os.path.join(os.path.dirname(sys.executable), "transformers")
    return [exe, "serve", "--continuous-batching", "--dtype", str(opts.get("dtype", "bfloat16")), "--host",
            "127.0.0.1", "--port", str(port)]


def _vllm_command(path: str, opts: dict, port: int) -> list[str]:
    """vLLM's OpenAI API server from its own venv (the distribution is ``vllm-cpu``, so its ``vllm`` script fails:
    run the module), serving ``path`` under its path as the model name."""
    python = os.path.join(str(opts.get("venv", ".venv-vllm")), "bin", "python")
    if not os.path.exists(python):
        raise ValueError(f"no vLLM environment at {python}: `bash ../shared/peers/vllm-cpu.sh install` makes one")
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--port", str(port), "--host",
           "127.0.0.1", "--dtype", str(opts.get("dtype", "bfloat16"))]
    return cmd


@contextlib.contextmanager
def _server(cmd: list[str], env: dict, port: int, timeout_s: float = 900.0):
    """An OpenAI server in a subprocess, up once ``/v1/models`` answers 200; its output goes to a log file whose
    tail is raised if it exits or does not come up."""
    import subprocess
    import tempfile

    import requests

    log = tempfile.NamedTemporaryFile("w+", prefix="bench-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                tail = "".join(log.readlines()[-15:])
                raise RuntimeError(f"{cmd[0]} did not come up (exit code {proc.poll()}; log {log.name}):\n{tail}")
            time.sleep(0.5)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _cpu_threads(opts: dict, tp: int) -> dict:
    """On cpu, this machine's cores split among the ranks, unless ``num_cpus_per_worker`` is given."""
    if opts.get("device", "cpu") != "cpu":
        return opts
    return {"num_cpus_per_worker": max(1, (os.cpu_count() or 1) // tp), **opts}


@contextlib.contextmanager
def _raytp_app(model: str, opts: dict, port: int, timeout_s: float = 900.0):
    import ray
    from ray import serve

    from raytp.serve.app import build_app

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    args = {"model": model, **_cpu_threads(opts, int(opts.get("tensor_parallel_size", 1)))}
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(args), name="raytp-bench", route_prefix="/")
        wait_healthy(f"http://127.0.0.1:{port}", timeout_s, f"raytp {opts}")
        yield
    finally:
        serve.shutdown()


def wait_healthy(url: str, timeout_s: float, what: str) -> None:
    """Poll ``url``/health until it answers 200; ``TimeoutError`` naming ``what`` after ``timeout_s``."""
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/health", timeout=10).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} was not healthy after {timeout_s:.0f}s")
        time.sleep(0.5)
