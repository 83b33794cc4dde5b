"""Incremental detokenization with exact stop-string cuts.

Text is emitted only when it is stable: never a partial multi-byte character (the
decoder's U+FFFD marks one) and never a tail that could still become a stop string,
so a stop string never leaks into a stream, even when it spans several tokens (or, with
``include_stop_str``, the text ends with the stop string that ended it, as vLLM's
``include_stop_str_in_output``).
"""

from __future__ import annotations


class IncrementalDetokenizer:
    """``skip_special_tokens``: special tokens decode to no text (vLLM's default); ``include_stop_str``: a stop
    string that ends the text is returned with it."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), *, skip_special_tokens: bool = True,
                 include_stop_str: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.include_stop_str = include_stop_str
        self.stop = tuple(s for s in stop if s)
        self._holdback = max((len(s) for s in self.stop), default=1) - 1
        self._ids: list[int] = []
        self._prefix = 0  # decode window start: a token boundary where text was clean
        self._read = 0  # tokens whose text is already in self.text
        self.text = ""  # all decoded text so far (before any stop cut)
        self._emitted = 0  # chars of self.text already returned

    def add(self, token_id: int, check_stop: bool = True) -> tuple[str, bool]:
        """Add one generated token; return (new stable text, stop string hit). ``check_stop`` False (before
        min_tokens): no stop string ends the sequence yet, text is still held back as usual."""
        self._ids.append(token_id)
        self._read_new_tokens(final=False)
        # The holdback guarantees any new stop match starts at or after the emitted text.
        hits = [(at, len(s)) for s in self.stop if (at := self.text.find(s, self._emitted)) != -1] if check_stop \
            else []
        if hits:
            at, length = min(hits)
            if self.include_stop_str:
                at += length
            delta = self.text[self._emitted:at]
            self._emitted = at
            return delta, True
        stable = len(self.text) - self._holdback
        if stable <= self._emitted:
            return "", False
        delta = self.text[self._emitted:stable]
        self._emitted = stable
        return delta, False

    def flush(self) -> str:
        """Everything not yet returned; call when the sequence ends without a stop string.

        Includes held-back text and the text of trailing tokens that never completed a
        character (decoded as U+FFFD, as a full decode of the output would show them)."""
        if self._read < len(self._ids):
            self._read_new_tokens(final=True)
        delta = self.text[self._emitted:]
        self._emitted = len(self.text)
        return delta

    def _read_new_tokens(self, final: bool) -> None:
        """Append the text of tokens past ``_read`` to ``self.text``: only once it is whole, unless ``final``."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            self.text += new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)
