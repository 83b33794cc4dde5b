"""What one engine step costs besides the model: bytes sent to the ranks and Python time on the driver and on the
rank, now and at an earlier commit, in one run.

    .venv/bin/python benchmarks/step_overhead.py --model raytp-llama-0.5b --compare 6408140

For each batch size (``--batches``), that many requests (``--prompt-len`` random tokens, ``--new-tokens`` each,
greedy; ``--penalty`` adds a repetition penalty, whose token history ranks read) run through the engine in
process (``LocalExecutor``, TP=1, the config's CPU defaults). Steps run one at a time (``async_scheduling:
false``), so each step's driver work is measured apart from the rank's. Per decode step (every row one token):
  bytes      the ``StepInput`` as pickled for a rank (what each Ray call to each rank carries);
  driver ms  a step's wall time (launch to finish) minus the executor's (scheduling, building the message,
             updating);
  rank ms    the rank's ``step`` wall time minus the model's forward (unpacking, metadata, sampling).
Medians over the decode steps. ``--compare REF`` runs the same measurement on a git worktree of REF (each side in
its own subprocess, alternately). Results: benchmarks/results/step_overhead.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import random
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def measure(args) -> dict:
    """In this process (``sys.path`` points at the checkout under test): one result per batch size."""
    from transformers import AutoTokenizer

    from raytp.config import resolve
    from raytp.engine.engine import make_engine
    from raytp.gang.local import LocalExecutor
    from raytp.messages import SamplingParams

    # one step at a time (async_scheduling off: a field older checkouts do not know, hence only if this one does)
    fields = {"model": args.model, "tensor_parallel_size": 1, "device": "cpu",
              "max_num_seqs": max(args.batches), "max_num_batched_tokens": 8192}
    from raytp.config import RaytpConfig

    if "async_scheduling" in RaytpConfig.model_fields:
        fields["async_scheduling"] = False
    cfg = resolve(fields)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    rng = random.Random(0)
    out = {}

    async def run(batch: int) -> dict:
        executor = LocalExecutor(cfg)
        engine = make_engine(cfg, executor, tokenizer)
        await engine.start()
        runner = executor.runner
        steps = []  # (decode?, bytes, engine s, executor s, rank s, forward s)
        current = {}

        def pre(*_a, **_k):
            current["fwd_start"] = time.perf_counter()

        def post(*_a, **_k):
            current["fwd"] = current.get("fwd", 0.0) + time.perf_counter() - current["fwd_start"]

        runner.model.register_forward_pre_hook(pre)
        runner.model.register_forward_hook(post)
        real_runner_step, real_exec_step, real_engine_step = runner.step, executor.step, getattr(engine, "step", None)

        def runner_step(step):
            start = time.perf_counter()
            result = real_runner_step(step)
            current["rank"] = time.perf_counter() - start
            return result

        async def exec_step(step):
            current.update(bytes=len(pickle.dumps(step, protocol=5)), fwd=0.0,
                           decode=bool(step.rows) and all(len(r.token_ids) == 1 for r in step.rows))
            start = time.perf_counter()
            result = await real_exec_step(step)
            current["exec"] = time.perf_counter() - start
            return result

        async def engine_step():
            current.clear()
            start = time.perf_counter()
            busy = await real_engine_step()
            if "exec" in current:
                steps.append((current["decode"], current["bytes"], time.perf_counter() - start, current["exec"],
                              current["rank"], current["fwd"]))
            return busy

        runner.step, executor.step = runner_step, exec_step
        loop_owner = getattr(engine, "core", engine)  # since issue 26 the loop is the engine core's (own thread)
        if hasattr(loop_owner, "_launch"):  # since async scheduling: the loop launches a step, then finishes it
            real_launch, real_finish = loop_owner._launch, loop_owner._finish

            def launch():
                current.clear()
                current["start"] = time.perf_counter()
                return real_launch()

            async def finish(launched):
                await real_finish(launched)
                steps.append((current["decode"], current["bytes"], time.perf_counter() - current["start"],
                              current["exec"], current["rank"], current["fwd"]))

            loop_owner._launch, loop_owner._finish = launch, finish
        else:
            engine.step = engine_step
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True,
                                repetition_penalty=1.1 if args.penalty else 1.0)

        async def one(i):
            prompt = tuple(rng.randrange(10, 400) for _ in range(args.prompt_len))
            async for _ in engine.generate(f"b{batch}-{i}", prompt, params):
                pass

        try:
            await asyncio.gather(*(one(i) for i in range(batch)))
        finally:
            engine.shutdown()
        decode = [s for s in steps if s[0]]
        return {"decode_steps": len(decode), "bytes": statistics.median(s[1] for s in decode),
                "driver_ms": 1e3 * statistics.median(s[2] - s[3] for s in decode),
                "rank_ms": 1e3 * statistics.median(s[4] - s[5] for s in decode),
                "step_ms": 1e3 * statistics.median(s[2] for s in decode)}

    for b in args.batches:
        out[str(b)] = asyncio.run(run(b))
    return out


def worktree(ref: str) -> str:
    path = f"/tmp/raytp-{ref}"
    if not os.path.isdir(path):
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", path, ref], check=True,
                       capture_output=True)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="raytp-llama-0.5b")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--penalty", action="store_true", help="repetition_penalty 1.1 on every request")
    ap.add_argument("--compare", metavar="REF", help="also measure this git commit (a worktree under /tmp)")
    ap.add_argument("--child", metavar="PATH", help=argparse.SUPPRESS)  # measure the checkout at PATH, print JSON
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, args.child)
        import raytp

        assert os.path.dirname(os.path.dirname(os.path.abspath(raytp.__file__))) == os.path.abspath(args.child)
        print("RESULT " + json.dumps(measure(args)))
        return
    sides = {"now": ROOT}
    if args.compare:
        sides[args.compare] = worktree(args.compare)
    child = list(sys.argv[1:])
    results = {}
    for name, path in sides.items():
        proc = subprocess.run([sys.executable, __file__, *child, "--child", path], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": path})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name}: {proc.stderr[-3000:]}")
        results[name] = json.loads(line[7:])
    sys.path.insert(0, HERE)
    from _results import write

    lines = [f"Decode steps of `{args.model}` on CPU, TP=1 in process, prompts {args.prompt_len} tokens, "
             f"{args.new_tokens} new{', repetition penalty' if args.penalty else ''} (medians over decode steps).", "",
             "| code | batch | bytes / step | driver Python ms / step | rank Python ms / step | step ms |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, per_batch in results.items():
        for b, r in per_batch.items():
            lines.append(f"| {name} | {b} | {r['bytes']:.0f} | {r['driver_ms']:.2f} | {r['rank_ms']:.2f} | "
                         f"{r['step_ms']:.1f} |")
    write("step_overhead" + ("_penalty" if args.penalty else ""), {"args": vars(args), "results": results}, lines)


if __name__ == "__main__":
    main()
