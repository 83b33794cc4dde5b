"""A tokenizer shared by threads (``raytp.engine.tokenizer``): the serving side's request-preparation thread and
its event loop share one through ``LockedTokenizer``; the engine core decodes with a copy of its own."""

import threading

from raytp.engine.tokenizer import LockedTokenizer

TEXT = "the model serves tokens across ranks and requests arrive " * 20


def hammer(tok, calls: int = 1500) -> list[str]:
    """Two threads at once: one encodes truncated to 8 tokens, the other encodes in full and decodes; returns what
    came back wrong (or raised)."""
    full, short = tok(TEXT)["input_ids"], tok(TEXT, truncation=True, max_length=8)["input_ids"]
    text = tok.decode(full)
    wrong: list[str] = []

    def truncating():
        for _ in range(calls):
            try:
                if tok(TEXT, truncation=True, max_length=8)["input_ids"] != short:
                    wrong.append("truncated encode")
            except Exception as e:  # noqa: BLE001 - e.g. tokenizers' "Already borrowed"
                wrong.append(repr(e))

    def full_length():
        for _ in range(calls):
            try:
                if tok.encode(TEXT) != full or tok.decode(full) != text:
                    wrong.append("full encode / decode")
            except Exception as e:  # noqa: BLE001
                wrong.append(repr(e))

    threads = [threading.Thread(target=f) for f in (truncating, full_length)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return wrong


def test_a_locked_tokenizer_hammered_from_two_threads_never_mixes_their_settings(tiny_tokenizer):
    assert hammer(LockedTokenizer(tiny_tokenizer)) == []


def test_a_locked_tokenizer_reads_like_the_tokenizer_and_copies_bare(tiny_tokenizer):
    import copy
    import inspect

    tok = LockedTokenizer(tiny_tokenizer)
    assert len(tok) == len(tiny_tokenizer) and tok.eos_token_id == tiny_tokenizer.eos_token_id
    assert tok.chat_template == tiny_tokenizer.chat_template
    assert "add_generation_prompt" in inspect.signature(tok.apply_chat_template).parameters
    own = copy.deepcopy(tok)
    assert type(own) is type(tiny_tokenizer) and own is not tiny_tokenizer
    assert own.encode("requests arrive") == tiny_tokenizer.encode("requests arrive")


def test_the_engine_core_decodes_with_a_tokenizer_of_its_own(tiny_tokenizer):
    from raytp.engine.engine import Engine
    from raytp.testing import ScriptedExecutor

    engine = Engine(ScriptedExecutor(), LockedTokenizer(tiny_tokenizer))
    assert engine.core.tokenizer is not tiny_tokenizer and not isinstance(engine.core.tokenizer, LockedTokenizer)
