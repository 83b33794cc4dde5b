"""TP=2 (DeepSpeed AutoTP over gloo + shm all-reduce, 2 Ray actors) == TP=1 == plain transformers, float32 greedy;
and with ``batch_invariant``, a TP=2 request's tokens and log-probabilities are the same alone and batched."""

import pytest
import torch

from tests.conftest import run_gang

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    return [tiny_tokenizer.encode(t)
            for t in ("the model serves tokens", "requests arrive and stream on xpu devices quickly")]


@pytest.fixture(scope="module")
def hf_reference(tiny_model_path, prompts):
    from transformers import AutoModelForCausalLM

    from raytp.compat import dtype_kwarg

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, **dtype_kwarg(torch.float32)).eval()
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = model.generate(ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
        out.append(gen[0, len(p):].tolist())
    return out


@pytest.fixture(scope="module")
def runs(ray_session, prompts):
    """Per TP size, one gang: each prompt alone, then both prompts batched together (padded rows)."""
    cfg = {"model": "raytp-tiny-llama", "dtype": "float32", "device": "cpu"}
    batches = [[p] for p in prompts] + [prompts]
    out = {tp: run_gang({**cfg, "tensor_parallel_size": tp}, batches, MAX_TOKENS) for tp in (1, 2)}
    # TP=2 with the model step compiled: DeepSpeed's all-reduce op inside the compiled graph; twice, as a restart,
    # where the compiled decode graphs exist (transformers >= 5)
    from raytp.gang.attention import hf

    for name in ("2c", "2c restarted") if hf.register() else ("2c",):
        out[name + " reports"] = []
        out[name] = run_gang({**cfg, "tensor_parallel_size": 2, "compile_model": True}, batches, MAX_TOKENS,
                             reports=out[name + " reports"])
    return out


def test_tp2_equals_tp1_equals_transformers(runs, hf_reference):
    for tp in (1, 2):
        alone = [batch[0] for batch in runs[tp][:-1]]
        assert alone == hf_reference, f"TP={tp}"
    assert len(set(map(tuple, hf_reference))) == 2, "different prompts give different outputs (the check can fail)"


def test_tp2_batched_with_padding_equals_tp1_batched(runs, hf_reference):
    assert runs[2][-1] == runs[1][-1] == hf_reference


def test_tp2_compiled_equals_tp2_eager(runs):
    assert runs["2c"] == runs[2]


def test_a_restarted_tp2_gang_loads_its_compiled_graphs_whole(runs):
    """Each rank of the second compiled gang loads both decode graphs from the graph store (the first gang saved
    them, or found them there): no tracing, no compiling; the tokens are the eager gang's."""
    from raytp.gang import graph_store
    from raytp.gang.attention import hf

    if not (graph_store.available() and hf.register()):
        pytest.skip("no compiled decode graphs here (aot_compile: torch >= 2.10; transformers >= 5)")
    first, restarted = runs["2c reports"], runs["2c restarted reports"]
    assert [(r.decode_mode, r.graphs_compiled + r.graphs_loaded) for r in first] == [("compiled", 2)] * 2
    assert [(r.graphs_compiled, r.graphs_loaded) for r in restarted] == [(0, 2)] * 2
    assert runs["2c restarted"] == runs[2]


def test_tp2_batch_invariant_alone_equals_among_others(ray_session, prompts):
    """One prompt alone, then the same prompt started with 7 others (each batch concurrent): the same tokens and
    log-probabilities, float32 (where an M = 1 product rounds differently from the same row in a batch)."""
    import random

    gen = random.Random(0)
    others = [[gen.randrange(10, 400) for _ in range(gen.randrange(5, 60))] for _ in range(7)]
    cfg = {"model": "raytp-tiny-llama", "dtype": "float32", "device": "cpu", "tensor_parallel_size": 2,
           "batch_invariant": True, "max_num_batched_tokens": 64, "max_num_seqs": 16}
    from raytp.gang.attention import hf

    if not hf.register():  # transformers < 5: no sdpa backend over the paged cache, so no batch_invariant
        from raytp.errors import ConfigError

        with pytest.raises(ConfigError, match="batch_invariant"):
            run_gang(cfg, [[prompts[1]]], 1)
        return
    alone, batched = run_gang(cfg, [[prompts[1]], [prompts[1], *others]], MAX_TOKENS, logprobs=True)
    assert alone[0] == batched[0]
