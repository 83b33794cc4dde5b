"""IPEX-LLM low-bit on CPU, for real: AutoTP TP=2 shards → optimize_model(low_bit) → served over HTTP.

Runs in the ipex-llm environment (transformers 4.47, `make test-ipex`); skipped where ipex-llm is absent.
Greedy tokens of the TP=2 low-bit gang must equal a single-process IPEX-LLM model of the same format.
"""

import pytest
import requests
import torch

from tests.conftest import URL, run_gang, serve_app

ipex_llm = pytest.importorskip("ipex_llm")
pytestmark = pytest.mark.ipex
MODEL = "raytp-tiny-llama"
MAX_TOKENS = 16
PROMPT = "the model serves tokens"


def single_process_reference(model_path, low_bit, prompt_ids):
    from transformers import AutoModelForCausalLM

    from raytp.compat import dtype_kwarg

    model = AutoModelForCausalLM.from_pretrained(model_path, **dtype_kwarg(torch.float32)).eval()
    model = ipex_llm.optimize_model(model, low_bit=low_bit, modules_to_not_convert=["lm_head"])
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("low_bit", ["sym_int4", "sym_int8"])
def test_tp2_low_bit_matches_single_process(ray_session, tiny_model_path, tiny_tokenizer, low_bit):
    prompt_ids = tiny_tokenizer.encode(PROMPT)
    ref = single_process_reference(tiny_model_path, low_bit, prompt_ids)
    tp2 = run_gang({"model": MODEL, "tensor_parallel_size": 2, "device": "cpu", "dtype": "float32",
                    "low_bit": low_bit}, [[prompt_ids]], MAX_TOKENS)[0][0]
    assert tp2 == ref


def test_tp2_sym_int4_serves_over_http(ray_session, tiny_model_path, tiny_tokenizer):
    prompt_ids = tiny_tokenizer.encode(PROMPT)
    ref_text = tiny_tokenizer.decode(single_process_reference(tiny_model_path, "sym_int4", prompt_ids),
                                     skip_special_tokens=True)
    with serve_app({"model": MODEL, "tensor_parallel_size": 2, "device": "cpu", "dtype": "float32",
                    "low_bit": "sym_int4"}):
        assert requests.get(URL + "/health", timeout=30).status_code == 200
        r = requests.post(URL + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == ref_text


def test_tp2_sym_int4_continuous_batching_equals_solo(ray_session, tiny_tokenizer):
    """IPEX-LLM's own KV-cache classes survive row filtering and merging."""
    import asyncio

    from raytp.config import resolve
    from raytp.engine.engine import Engine
    from raytp.engine.scheduler import SchedulerConfig
    from raytp.gang.executor import RayExecutor
    from raytp.messages import SamplingParams

    cfg = resolve({"model": MODEL, "tensor_parallel_size": 2, "device": "cpu", "dtype": "float32",
                   "low_bit": "sym_int4"})
    prompts = [tiny_tokenizer.encode(t)
               for t in ("the model", "requests arrive and stream on xpu", "cpu", "the gang keeps")]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (12, 5, 9, 16)]

    async def collect(engine, rid, prompt, sp, delay=0.0):
        await asyncio.sleep(delay)
        return [t for out in [o async for o in engine.generate(rid, tuple(prompt), sp)] for t in out.token_ids]

    async def main():
        engine = Engine(RayExecutor(cfg), tiny_tokenizer, SchedulerConfig("continuous", 4, 16, 64))
        await engine.start()
        try:
            solo = [await collect(engine, f"solo{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
            together = await asyncio.gather(*(collect(engine, f"c{i}", p, sp, 0.05 * i)
                                              for i, (p, sp) in enumerate(zip(prompts, params))))
            return solo, together
        finally:
            engine.shutdown()

    solo, together = asyncio.run(main())
    assert [len(s) for s in solo] == [12, 5, 9, 16]
    assert together == solo
