"""lm-evaluation-harness against the real HTTP app (scripted gang), on tasks written here: a multiple-choice task
(log-likelihoods: token-id prompts, echo, logprobs, max_tokens 0) and a generate_until task sent in batches of
4 prompts. The scores of a scripted model mean nothing; that both tasks run to a score is the test."""

import json

import pytest

from tests.conftest import URL
from tests.serve.conftest import MODEL

lm_eval = pytest.importorskip("lm_eval")

MC = """task: raytp_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GEN = """task: raytp_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n", "Question:"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


def test_lm_eval_multiple_choice_and_batched_generation(app, tmp_path, tiny_model_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    words = ["model", "serves", "tokens", "requests", "arrive", "stream"]
    with open(tmp_path / "mc.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"question": f"which word follows {words[i]}?", "choices": words[:3],
                                "answer": i % 3}) + "\n")
    with open(tmp_path / "gen.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"question": f"say {words[i]}:", "answer": words[i]}) + "\n")
    (tmp_path / "mc.yaml").write_text(MC.format(dir=tmp_path))
    (tmp_path / "gen.yaml").write_text(GEN.format(dir=tmp_path))
    out = simple_evaluate(
        model="local-completions",
        model_args=f"model={MODEL},base_url={URL}/v1/completions,tokenizer={tiny_model_path},"
                   "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1",
        tasks=["raytp_mc", "raytp_gen"], task_manager=TaskManager(include_path=str(tmp_path)), batch_size=4,
        log_samples=True)
    results = out["results"]
    assert 0.0 <= results["raytp_mc"]["acc,none"] <= 1.0
    assert 0.0 <= results["raytp_gen"]["exact_match,none"] <= 1.0
    assert len(out["samples"]["raytp_mc"]) == 6 and len(out["samples"]["raytp_gen"]) == 6
    mc = out["samples"]["raytp_mc"][0]["resps"]  # per choice: (log-likelihood, is_greedy) from our logprobs
    assert all(isinstance(r[0][0], float) for r in mc)
