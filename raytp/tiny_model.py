"""Deterministic random-weight Llama checkpoints generated locally (no network).

``ensure(name)`` returns a directory holding a Hugging Face checkpoint (config,
safetensors weights, a byte-level BPE tokenizer trained here on a fixed corpus,
and a chat template). The same name always yields the same weights for a given
torch version. Generation is guarded by a file lock and an atomic rename, so
concurrent processes (ranks, test workers) share one copy.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile

# name -> (LlamaConfig overrides, dtype saved on disk)
PRESETS: dict[str, tuple[dict, str]] = {
    "raytp-tiny-llama": (
        dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.2),
        "float32",
    ),
    "raytp-llama-0.5b": (
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=28, num_attention_heads=16,
             num_key_value_heads=8, max_position_embeddings=2048, initializer_range=0.02),
        "bfloat16",
    ),
}
_FORMAT_VERSION = "2"
VOCAB_SIZE = 512
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def cache_dir() -> str:
    return os.environ.get("RAYTP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "raytp")


def ensure(name: str) -> str:
    """Return the checkpoint directory for preset ``name``, generating it once if missing."""
    if name not in PRESETS:
        raise KeyError(f"unknown built-in model {name!r}; known: {sorted(PRESETS)}")
    root = os.path.join(cache_dir(), "models")
    os.makedirs(root, exist_ok=True)
    target = os.path.join(root, f"{name}-v{_FORMAT_VERSION}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    with open(os.path.join(root, f".{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(target, "config.json")):
            tmp = tempfile.mkdtemp(dir=root, prefix=f".{name}-")
            os.chmod(tmp, 0o755)
            try:
                _generate(name, tmp)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _corpus() -> list[str]:
    """A fixed, varied corpus: enough for a few hundred BPE merges, including multi-byte text."""
    words = ("the model serves tokens across ranks while the gang keeps every shard in lockstep "
             "requests arrive stream and finish quickly on cpu xpu and cuda devices").split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(200)]
    lines += ["Grüße aus Zürich — naïve café déjà vu", "日本語のテキストと絵文字 🚀🙂",
              "0123456789 + - * / = ( ) [ ] { }"]
    return lines


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _generate(name: str, out_dir: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    overrides, dtype = PRESETS[name]
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,  # AutoTP shards lm_head on its own; tied weights would be split twice
        **overrides,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    _portable_tokenizer_config(out_dir)


def _portable_tokenizer_config(out_dir: str) -> None:
    """Make the tokenizer load in transformers 4.x too (the ipex-llm environment shares this cache):
    name a class both know, and keep the chat template inside tokenizer_config.json."""
    import json

    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
