"""Shared fixtures. Tests are split by what they need: unit/ (no Ray, no model weights),
integration/ (local Ray, gloo + DeepSpeed shm, tiny random Llama, TP=2), ipex/ (ipex-llm
environment), device/ (real XPU / CUDA; skipped where absent)."""

import os

import pytest

# A test run must never reach a hub, and float32 keeps TP=2 == TP=1 exact.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def tiny_model_path():
    from raytp import tiny_model

    return tiny_model.ensure("raytp-tiny-llama")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)
