"""The paged-KV engine on the real tiny model, in process (no Ray, ``LocalExecutor``), float32.

Property: whatever the schedule — random prompts sharing prefixes (prefix-cache hits), random arrival times,
a token budget that chunks prompts, a KV budget so small that running requests are preempted and recomputed —
every greedy output equals the same prompt run through plain transformers with no cache at all."""

import asyncio
import random

import pytest
import torch

from raytp.messages import SamplingParams

BLOCK = 4


@pytest.fixture(scope="module")
def model(tiny_model_path):
    from transformers import AutoModelForCausalLM

    from raytp.compat import dtype_kwarg

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, **dtype_kwarg(torch.float32)).eval()


def alone(model, prompt, n: int) -> list[int]:
    """Greedy tokens with no KV cache at all: the whole sequence recomputed for every token."""
    ids, out = list(prompt), []
    with torch.inference_mode():
        for _ in range(n):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            out.append(token)
    return out


def make_engine(model, tokenizer, **overrides):
    from raytp.config import resolve
    from raytp.engine.engine import make_engine
    from raytp.gang.local import LocalExecutor

    cfg = resolve({"model": "raytp-tiny-llama", "tensor_parallel_size": 1, "device": "cpu", "dtype": "float32",
                   "block_size": BLOCK, **overrides})
    return make_engine(cfg, LocalExecutor(cfg, model=model), tokenizer)


async def generate(engine, rid, prompt, max_tokens, delay=0.0):
    await asyncio.sleep(delay)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    tokens = []
    async for out in engine.generate(rid, tuple(prompt), params):
        tokens += out.token_ids
    return tokens


def needs_backend(backend: str) -> None:
    """The triton backend needs transformers' attention interface (5.x) and, here, Triton's interpreter."""
    from raytp.gang.attention import hf
    from raytp.platforms.base import triton_importable_here as triton_importable

    if backend == "triton" and not (hf.register() and triton_importable()):
        pytest.skip("the triton backend needs transformers >= 5 and triton (the 'kernels' extra)")


@pytest.mark.parametrize("backend,seed", [("sdpa", 0), ("sdpa", 1), ("sdpa", 2), ("triton", 0), ("triton", 1)])
def test_any_schedule_equals_plain_transformers(model, tiny_tokenizer, backend, seed):
    needs_backend(backend)
    check_random_schedule(model, tiny_tokenizer, seed, attention_backend=backend)


class FixedShapesOnly:
    """A capture strategy that records nothing: every "replay" runs the bucket's forward again over the persistent
    buffers, so the fixed-shape path (padding, buffers, bucket choice) runs on CPU exactly as graphs would replay."""

    name = "fixed_shapes"

    def capture(self, keys, forward):
        return {key: (lambda key=key: forward(key)) for key in keys}


def runs_on_fixed_shapes(monkeypatch, policy) -> list:
    """Force the graph runner on (with ``FixedShapesOnly``) and record each step it runs:
    (rows, tokens, bucket, every row sampled)."""
    from raytp.gang.attention import hf
    from raytp.platforms.cpu import CpuPlatform

    if not hf.register():
        pytest.skip("fixed-shape steps need transformers' attention interface (transformers >= 5)")
    monkeypatch.setattr(CpuPlatform, "graph_capture", lambda self, eager, tp: FixedShapesOnly())
    runs = []
    real_load = policy.load
    monkeypatch.setattr(policy, "load", lambda self, rows, bucket, tables: runs.append(
        (len(rows), sum(len(r.token_ids) for r in rows), bucket, all(r.sample for r in rows)))
        or real_load(self, rows, bucket, tables))
    return runs


@pytest.mark.parametrize("seed", [0, 3])
def test_fixed_shape_decode_steps_equal_plain_transformers(model, tiny_tokenizer, seed, monkeypatch):
    """sdpa: decode steps padded to batch and width buckets (the shapes CUDA graphs replay; here run eagerly, so
    on CPU): padding rows, padded tables and null-block writes never change a token."""
    from raytp.gang.attention.shapes import DecodeBuckets

    runs = runs_on_fixed_shapes(monkeypatch, DecodeBuckets)
    status = check_random_schedule(model, tiny_tokenizer, seed, attention_backend="sdpa")
    assert status["graph_replays"] == len(runs) > 0
    assert any(n < b for n, _, (b, _), _ in runs), "some decode steps were padded to a larger batch bucket"
    assert len({w for *_, (_, w), _ in runs}) > 1, "decode steps used several width buckets"


@pytest.mark.parametrize("seed", [3, 4])
def test_fixed_shape_whole_steps_equal_plain_transformers(model, tiny_tokenizer, seed, monkeypatch):
    """With the triton kernel, whole steps — mixed ones too — run padded to token buckets (the shapes CUDA graphs
    replay; here eagerly, the kernel in Triton's interpreter): empty padding rows, row-less padding tokens and
    their null-block writes never change a token, under chunking, preemption and prefix hits."""
    from raytp.gang.attention.shapes import TokenBuckets

    needs_backend("triton")
    runs = runs_on_fixed_shapes(monkeypatch, TokenBuckets)
    status = check_random_schedule(model, tiny_tokenizer, seed, attention_backend="triton")
    assert status["graph_replays"] == len(runs) > 0
    assert any(tokens > rows for rows, tokens, _, _ in runs), "steps with prompt chunks ran on fixed shapes"
    assert any(tokens == rows for rows, tokens, _, _ in runs), "decode-only steps too"
    assert any(tokens < bucket for _, tokens, bucket, _ in runs), "some steps were padded to a larger bucket"
    assert any(not sampled for *_, sampled in runs), "some rows computed a chunk without sampling"


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_compiled_step_equals_plain_transformers_and_never_recompiles(model, tiny_tokenizer, backend):
    """The model step compiled once (sdpa on CPU: decode steps, one graph, attention traced inline; triton: every
    step, one graph, attention an opaque op): a random schedule — decodes, chunks, mixed steps, preemption, prefix
    hits — gives plain transformers' tokens with no recompile."""
    from raytp.gang.attention import hf

    if not hf.register():
        pytest.skip("the compiled step needs transformers' attention interface (transformers >= 5)")
    needs_backend(backend)
    counts = check_random_schedule(model, tiny_tokenizer, 5, attention_backend=backend, compile_model=True)
    assert counts["recompiles"] == 0
    # sdpa on CPU compiles decode steps only (attention inline), so the schedule's decode steps ran the graph
    assert counts["compiled_decode_only"] == (backend == "sdpa")
    assert counts["compiled_steps"] > 10
    # two graphs at start-up (one row; more rows / tokens), each compiled or loaded once: no graph break
    assert counts["warm_up_graphs"] == 2
    assert counts["decode_mode"] == "compiled"


def test_a_model_step_the_compiler_cannot_take_runs_eagerly(model, tiny_tokenizer, monkeypatch, caplog, tmp_path):
    """compile_model is an optimisation (serve_config.yaml turns it on for any checkpoint): where Inductor fails,
    the rank warns, reports eager steps and serves the same tokens."""
    import torch._inductor.compile_fx

    from raytp.gang.attention import hf

    if not hf.register():
        pytest.skip("the compiled step needs transformers' attention interface (transformers >= 5)")

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler on this node")

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # no graph saved by an earlier test to load
    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", broken)
    counts = check_random_schedule(model, tiny_tokenizer, 6, compile_model=True)
    assert counts["compiled_steps"] == 0 and counts["recompiles"] is None  # no graph kept
    assert counts["decode_mode"] == "eager"
    assert "could not be compiled (RuntimeError: no C++ compiler on this node)" in caplog.text


def test_a_restart_loads_the_compiled_step_whole_and_runs_it_with_its_own_weights(tiny_model_path, tmp_path,
                                                                                  monkeypatch):
    """The compiled CPU decode graphs hold no weight (their packed linears are ``raytp::packed_linear`` calls by
    index) and are saved whole (``raytp.gang.graph_store``): a second model of the same shapes — a restart —
    loads both, compiling nothing and looking nothing up in AOTAutograd's or Inductor's caches, and its steps
    compute with its own weights, not those of the model that saved them, over a KV pool of another size.
    (Unreadable and stale files: ``tests/unit/test_graph_store.py``.)"""
    from torch._dynamo.utils import counters
    from transformers import AutoConfig, AutoModelForCausalLM

    from raytp.gang import attention, graph_store
    from raytp.gang.attention import hf
    from raytp.gang.linears import prepack_linears
    from raytp.gang.model_runner import ModelRunner
    from raytp.platforms import get

    if not hf.register():
        pytest.skip("the compiled step needs transformers' attention interface (transformers >= 5)")
    if not graph_store.available():
        pytest.skip("this torch cannot capture a compiled function whole (aot_compile)")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # empty: the first model fills it
    config = AutoConfig.from_pretrained(tiny_model_path)
    prompt = [5, 17, 42, 99, 7]
    wanted, got, made = [], [], []
    keys = [("inductor", "fxgraph_cache_hit"), ("inductor", "fxgraph_cache_miss"),
            ("aot_autograd", "autograd_cache_hit"), ("aot_autograd", "autograd_cache_miss")]
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).eval()  # random weights, the same shapes
        with torch.inference_mode():
            wanted.append(model(torch.tensor([prompt])).logits[0, -1])
        prepack_linears(model)  # as a rank loads it
        before = {k: counters[g][k] for g, k in keys}
        # another KV budget at each start (the pool's size is not a fact of the store: the graphs are dynamic in it)
        runner = ModelRunner(model, "cpu", 0, 1, block_size=BLOCK, kv_cache_bytes=(1 + seed) << 20, max_batch=4,
                             max_model_len=64, compile_options=get("cpu").compile_options(False, True))
        assert runner.compiled is not None
        made.append((runner.compiled.compiles, runner.compiled.loaded,
                     {k: counters[g][k] - before[k] for g, k in keys}))
        table = (1, 2)
        with torch.inference_mode():  # the prompt's head eagerly, its last token through the decode graph
            layout = [(len(prompt) - 1, 0, table)]
            meta = attention.build(layout, BLOCK, "cpu")
            runner.backend.prepare(meta, layout)
            runner._forward(meta, torch.tensor([prompt[:-1]]), torch.tensor([len(prompt) - 2]))
            meta = attention.build([(1, len(prompt) - 1, table)], BLOCK, "cpu")
            got.append(runner.compiled.decode(runner.backend, meta, torch.tensor([[prompt[-1]]]))[0])
    assert made[0][:2] == (2, 0), made  # compiled and saved (the first start)
    assert made[1] == (0, 2, dict.fromkeys(made[1][2], 0)), made  # loaded whole: no cache lookup at all
    assert len(list((tmp_path / "raytp-graphs").rglob("*.graph"))) == 2
    assert not torch.allclose(wanted[0], wanted[1], atol=1e-2)  # two models that a mix-up would show
    for want, logits in zip(wanted, got):
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)


def check_random_schedule(model, tiny_tokenizer, seed, **overrides):
    rng = random.Random(seed)
    shared = [rng.randrange(10, 400) for _ in range(11)]  # a "system prompt" of 2 full blocks + 3 tokens
    requests = []
    for i in range(9):
        head = shared[:rng.choice([0, 4, 8, 11])]
        prompt = head + [rng.randrange(10, 400) for _ in range(rng.randint(1, 12))]
        requests.append((f"r{i}", prompt, rng.randint(4, 16), rng.uniform(0, 0.02)))
    want = [alone(model, p, n) for _, p, n, _ in requests]
    # 10 usable blocks of 4 = 40 tokens: a request needs up to 39; several running at once must be preempted.
    # 6 tokens per step: prompts of up to 23 tokens are prefilled in chunks.
    from raytp.gang.model_runner import ModelRunner

    block_bytes = ModelRunner(model, "cpu", 0, 1, block_size=BLOCK, kv_cache_bytes=0).block_bytes  # what ranks see

    async def main():
        engine = make_engine(model, tiny_tokenizer, kv_cache_memory_bytes=11 * block_bytes, max_num_batched_tokens=6,
                             max_num_seqs=4, **overrides)
        await engine.start()
        try:
            got = await asyncio.gather(*(generate(engine, rid, p, n, d) for rid, p, n, d in requests))
            runner = engine.executor.runner
            from raytp.gang.report import load_report
            counts = {"graph_replays": runner.graphs.replays if runner.graphs is not None else 0,
                      "recompiles": runner.compiled.compiles - runner.compiled.warm_up_compiles
                      if runner.compiled is not None else None,
                      "compiled_steps": runner.compiled.steps if runner.compiled is not None else 0,
                      "warm_up_graphs": runner.compiled.warm_up_graphs if runner.compiled is not None else 0,
                      "decode_mode": load_report(0, 0.0, model, runner).decode_mode,  # what /health shows
                      "compiled_decode_only": runner.compiled is not None and runner.compiled.decode_only}
            return got, engine.status(), counts
        finally:
            engine.shutdown()

    got, status, counts = asyncio.run(main())
    assert got == want
    assert status.num_preemptions > 0, "the budget was meant to force preemption"
    assert status.prefix_cache_hit_rate > 0, "shared prefixes were meant to hit the cache"
    assert status.kv_cache_tokens == 10 * BLOCK and status.kv_cache_usage == 0
    return counts


def test_budget_below_one_block_fails_start_with_a_config_error(model, tiny_tokenizer):
    from raytp.errors import ConfigError

    engine = make_engine(model, tiny_tokenizer, kv_cache_memory_bytes=1000)
    with pytest.raises(ConfigError, match="kv_cache_memory_bytes"):
        asyncio.run(engine.start())


@pytest.mark.parametrize("layout,backend", [("consecutive", "sdpa"), ("scattered", "sdpa"), ("batched", "sdpa"),
                                            ("scattered", "triton")])
def test_consecutive_and_scattered_blocks_give_the_same_tokens(model, layout, backend):
    """The sdpa backend's three paths (a first chunk's own keys, a view of consecutive blocks, gathered scattered
    blocks; decode rows batched — on accelerators all of them, 'batched') and the triton kernel agree with plain
    transformers, rows mixing chunks and decodes in one step."""
    needs_backend(backend)
    scatter = layout == "scattered"
    from raytp.gang.model_runner import ModelRunner
    from raytp.messages import NewRequest, RowInput, StepInput

    runner = ModelRunner(model, "cpu", 0, 1, block_size=BLOCK, kv_cache_bytes=1 << 22, max_blocks=64,
                         attention_backend=backend)
    if runner.backend is not None and backend == "sdpa":  # (transformers 4.x: the compatibility adapter)
        runner.backend.batch_decode = layout == "batched"
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    prompts = [list(range(5, 8)), list(range(20, 29)), list(range(40, 54))]
    tables = [list(range(1 + 8 * i, 9 + 8 * i)) for i in range(3)]
    if scatter:  # every row's blocks out of order and interleaved with the others'
        tables = [[b for j, b in enumerate(range(60, 0, -1)) if j % 3 == i][:8] for i in range(3)]
    chunk = [99, 4, 6]  # row 0 whole, rows 1 and 2 in chunks while row 0 decodes
    tokens, computed, outs = [list(p) for p in prompts], [0, 0, 0], [[], [], []]
    known = [0, 0, 0]  # blocks of each table the runner was given so far: they arrive as the rows grow
    while any(len(o) < 8 for o in outs):
        new, rows = [], []
        for i in range(3):
            if len(outs[i]) < 8:
                n = min(len(tokens[i]) - computed[i], chunk[i])
                need = -(-(computed[i] + n) // BLOCK)
                if computed[i] == 0:
                    new.append(NewRequest(str(i), i, greedy, len(prompts[i]), tuple(tables[i][:need])))
                rows.append(RowInput(i, tuple(tokens[i][computed[i]:computed[i] + n]), computed[i],
                                     computed[i] + n == len(tokens[i]), tuple(tables[i][known[i]:need])
                                     if computed[i] else ()))
                known[i] = need
        sampled = iter(runner.step(StepInput(tuple(new), tuple(rows))).tokens)
        for r in rows:
            i = r.handle
            computed[i] += len(r.token_ids)
            if r.sample:
                token = next(sampled)
                outs[i].append(token)
                tokens[i].append(token)
    assert outs == [alone(model, p, 8) for p in prompts]


def test_repetition_penalty_equals_transformers(model, tiny_tokenizer):
    """The batched sampler's repetition penalty, greedy, through the paged engine == transformers' own
    RepetitionPenaltyLogitsProcessor in generate (same definition: prompt + output tokens)."""
    prompts = [list(range(5, 14)), [30, 31, 30, 31, 30]]
    want = []
    with torch.inference_mode():
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                 repetition_penalty=1.3)
            want.append(out[0, len(p):].tolist())

    async def main():
        engine = make_engine(model, tiny_tokenizer)
        await engine.start()
        try:
            params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=1.3)

            async def one(i, p):
                return [t async for out in engine.generate(f"r{i}", tuple(p), params) for t in out.token_ids]

            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        finally:
            engine.shutdown()

    got = asyncio.run(main())
    assert got == want
    assert want != [alone(model, p, 12) for p in prompts], "the penalty changed the tokens (the check can fail)"


def test_logprobs_are_the_models_log_softmax(model, tiny_tokenizer):
    """Greedy with logprobs through the paged engine: each token's logprob and its top alternatives equal
    log_softmax of plain transformers' logits at that position (temperature 1, nothing else applied)."""
    prompt = list(range(5, 14))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)

    async def main():
        engine = make_engine(model, tiny_tokenizer)
        await engine.start()
        try:
            outs = [o async for o in engine.generate("lp", tuple(prompt), params)]
            return [t for o in outs for t in o.token_ids], [e for o in outs for e in o.logprobs]
        finally:
            engine.shutdown()

    tokens, entries = asyncio.run(main())
    with torch.inference_mode():
        lp = torch.log_softmax(model(torch.tensor([prompt + tokens])).logits[0].float(), -1)
    for i, (token, (chosen, top, rank)) in enumerate(zip(tokens, entries)):
        row = lp[len(prompt) - 1 + i]
        assert chosen == pytest.approx(row[token].item(), abs=1e-4)
        assert [t for t, _ in top] == row.topk(3).indices.tolist() and top[0][0] == token and rank == 1


def test_echo_prompt_logprobs_are_the_models_across_chunks_and_cached_prefixes(model, tiny_tokenizer):
    """Prompt logprobs (echo) through the paged engine, the prompt prefilled in 5-token chunks, the same prompt
    twice (no prefix reuse for them: every position must be computed): each prompt token's logprob == log_softmax
    of plain transformers' logits at the position before it."""
    prompt = list(range(40, 63))
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=2)

    async def main():
        engine = make_engine(model, tiny_tokenizer, max_num_batched_tokens=5, max_num_seqs=2)
        await engine.start()
        try:
            async def one(rid):
                return [o async for o in engine.generate(rid, tuple(prompt), params)][0].prompt_logprobs

            return [await one("a"), await one("b")]
        finally:
            engine.shutdown()

    runs = asyncio.run(main())
    with torch.inference_mode():
        lp = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
    for entries in runs:
        assert len(entries) == len(prompt) - 1
        for p, (chosen, top, rank) in enumerate(entries, start=1):
            assert chosen == pytest.approx(lp[p - 1, prompt[p]].item(), abs=1e-4)
            assert [t for t, _ in top] == lp[p - 1].topk(2).indices.tolist()
            assert rank == int((lp[p - 1] >= lp[p - 1, prompt[p]]).sum())


def test_json_schema_output_parses_and_validates_on_the_real_model(model, tiny_tokenizer):
    """Structured output on the random-weight tiny model: whatever it would say, the grammar mask makes it a JSON
    object of the schema (greedy and sampled, alone and batched)."""
    import json

    from raytp.engine.structured import grammar_of

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]},
                                                "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["ok", "color", "n"], "additionalProperties": False}
    grammar = grammar_of("json", schema, "response_format")

    async def main():
        engine = make_engine(model, tiny_tokenizer)
        await engine.start()
        try:
            async def one(rid, temperature, seed):
                params = SamplingParams(max_tokens=64, temperature=temperature, seed=seed, grammar=grammar)
                outs = [o async for o in engine.generate(rid, tuple(tiny_tokenizer.encode("answer:")), params)]
                return "".join(o.text for o in outs), outs[-1].finish_reason

            return await asyncio.gather(*(one(f"r{i}", 0.0 if i == 0 else 1.0, i) for i in range(4)))
        finally:
            engine.shutdown()

    for text, reason in asyncio.run(main()):
        value = json.loads(text)
        assert reason == "stop" and set(value) == {"ok", "color", "n"}
        assert isinstance(value["ok"], bool) and value["color"] in ("red", "green") and 0 <= value["n"] <= 99


def test_every_rank_samples_and_fills_pending_rows_from_its_own_record(model, monkeypatch):
    """SPMD sampling: a rank other than 0 samples the same tokens as rank 0 from the same logits (greedy and seeded
    rows) and fills async scheduling's ``PENDING_TOKEN`` rows from its own record, with no collective before the
    forward (any would fail here: there is no process group); the pending path gives the tokens explicit inputs
    give."""
    import torch.distributed as dist

    from raytp.gang.model_runner import ModelRunner
    from raytp.messages import PENDING_TOKEN, NewRequest, RowInput, StepInput

    for name in ("broadcast", "all_reduce", "all_gather", "all_gather_object", "broadcast_object_list", "barrier"):
        monkeypatch.setattr(dist, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} called in a step"))
    runners = [ModelRunner(model, "cpu", rank, 2, block_size=BLOCK, kv_cache_bytes=1 << 20, max_blocks=32)
               for rank in (0, 1)]
    explicit = ModelRunner(model, "cpu", 0, 1, block_size=BLOCK, kv_cache_bytes=1 << 20, max_blocks=32)
    params = [SamplingParams(max_tokens=8, temperature=0.0), SamplingParams(max_tokens=8, temperature=0.9, seed=3)]
    prompts = [(5, 6, 7), tuple(range(20, 29))]
    new = tuple(NewRequest(str(h), h, params[h], len(p), tuple(range(1 + 5 * h, 6 + 5 * h)))
                for h, p in enumerate(prompts))
    first = StepInput(new, tuple(RowInput(h, p, 0, True) for h, p in enumerate(prompts)))
    tokens = [runners[0].step(first).tokens]
    assert runners[1].step(first).tokens == () and explicit.step(first).tokens == tokens[0]
    for i in range(6):
        pos = [len(p) + i for p in prompts]
        pending = StepInput(rows=tuple(RowInput(h, (PENDING_TOKEN,), pos[h], True) for h in range(2)))
        known = StepInput(rows=tuple(RowInput(h, (tokens[-1][h],), pos[h], True) for h in range(2)))
        out = runners[0].step(pending).tokens
        assert runners[1].step(pending).tokens == ()
        assert [runners[1].requests.last_sampled[h] for h in range(2)] == list(out), f"step {i}: ranks disagree"
        assert explicit.step(known).tokens == out
        tokens.append(out)
    assert len({t[1] for t in tokens}) > 1
