"""A Hugging Face tokenizer used by several threads.

A fast tokenizer is one Rust object, and transformers rewrites its truncation and padding settings before every
encode: two threads encoding at once can each run with the other's settings (on this project's tokenizer, a few
in every thousand concurrent calls came back truncated or untruncated wrongly) or fail with tokenizers'
``RuntimeError: Already borrowed`` (vLLM hit it when its API server's threads shared one). So a tokenizer is
either one thread's alone — the engine core decodes with a copy of its own — or shared through
``LockedTokenizer``, which the serving side (its request-preparation thread and its event loop) uses.
"""

from __future__ import annotations

import copy
import functools
import threading


class LockedTokenizer:
    """``tokenizer`` with every method call (``encode``, ``decode``, ``apply_chat_template``, ``len``, calling it)
    holding one lock; plain attributes (``chat_template``, ``eos_token_id``, ...) read through. A deep copy is the
    bare tokenizer: a copy is one thread's own and needs no lock."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._lock = threading.RLock()

    def __getattr__(self, name: str):
        value = getattr(self._tokenizer, name)
        if not callable(value):
            return value

        @functools.wraps(value)
        def locked(*args, **kwargs):
            with self._lock:
                return value(*args, **kwargs)

        return locked

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._tokenizer(*args, **kwargs)

    def __len__(self) -> int:
        with self._lock:
            return len(self._tokenizer)

    def __deepcopy__(self, memo):
        with self._lock:
            return copy.deepcopy(self._tokenizer, memo)
