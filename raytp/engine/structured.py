"""Structured output: JSON (any object, or one matching a JSON schema), a regular expression, one of a list of
strings, or a Lark / GBNF grammar, as a token mask per row.

Library choice (a short note, as the brief asks): llguidance (MIT; a Rust core with Python bindings and no
dependencies) over xgrammar (whose wheel requires triton, a multi-hundred-MB GPU compiler, even on a CPU-only
machine) and outlines-core (slower mask computation, per its and llguidance's published numbers). vLLM ships
both llguidance and xgrammar as backends.

The matchers live in the engine (the driver), next to the sequences they follow: before a step the engine asks
each constrained row's matcher for the tokens allowed next and sends them as a packed bitmask in the row
(``RowInput.allowed``); every rank masks those logits before it samples; after the step the engine feeds the sampled
token to the matcher. Ranks keep no grammar state (TP lockstep and preemption need nothing new), and a
recomputed sequence keeps its matcher (its tokens are not sampled again).
"""

from __future__ import annotations

import functools
import json

from raytp.errors import InvalidRequestError


def grammar_of(kind: str, spec, param: str) -> str:
    """llguidance's grammar for one output constraint, vLLM's kinds: ``json`` (a JSON schema, a dict or its text;
    compact: no free whitespace between tokens, so a model cannot pad forever), ``json_object`` (any object),
    ``regex``, ``choice`` (one of these strings,
    exactly: an alternation of literals), ``grammar`` (Lark, llguidance's dialect, or GBNF). llguidance builds
    every one (its ``grammar_from``); ``InvalidRequestError`` naming ``param`` if it cannot, or if the grammar is
    unusable."""
    import llguidance
    from llguidance import LLMatcher

    try:
        if kind in ("json", "json_object"):
            schema = {"type": "object"} if kind == "json_object" else spec
            schema = json.loads(schema) if isinstance(schema, str) else schema
            grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})
        else:
            grammar = llguidance.grammar_from(kind, json.dumps(spec) if kind == "choice" else spec)
    except Exception as e:  # noqa: BLE001 - llguidance's own message names what is wrong
        raise InvalidRequestError(f"{param}: invalid {_NAMES[kind]}: {e}", param=param) from None
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, None)
    if is_error:
        raise InvalidRequestError(f"{param}: unsupported {_NAMES[kind]}: {messages[0]}", param=param)
    return grammar


_NAMES = {"json": "JSON schema", "json_object": "JSON schema", "regex": "regular expression",
          "choice": "choice list", "grammar": "grammar"}


class Grammars:
    """Per engine: the tokenizer in llguidance's form (built once) and a matcher per constrained sequence."""

    def __init__(self, tokenizer):
        self._hf = tokenizer
        self.matchers: dict[str, object] = {}

    @functools.cached_property
    def _tokenizer(self):
        import llguidance.hf

        return llguidance.hf.from_tokenizer(self._hf)

    def add(self, seq_id: str, grammar: str) -> None:
        from llguidance import LLMatcher

        matcher = LLMatcher(self._tokenizer, grammar)
        if matcher.is_error():
            raise InvalidRequestError(f"response_format: {matcher.get_error()}", param="response_format")
        self.matchers[seq_id] = matcher

    def allowed(self, seq_id: str) -> bytes | None:
        """The packed bitmask (int32 words, bit i = token i allowed) of the next token, or None if unconstrained."""
        matcher = self.matchers.get(seq_id)
        if matcher is None:
            return None
        import llguidance.torch as lt

        mask = lt.allocate_token_bitmask(1, self._tokenizer.vocab_size)
        lt.fill_next_token_bitmask(matcher, mask, 0)
        return mask.numpy().tobytes()

    def accept(self, seq_id: str, token: int) -> bool:
        """Feed the sampled token; True once the grammar is complete (the sequence should stop)."""
        matcher = self.matchers.get(seq_id)
        if matcher is None:
            return False
        matcher.consume_token(token)
        return matcher.is_stopped()

    def drop(self, seq_id: str) -> None:
        self.matchers.pop(seq_id, None)
