from raytp.engine.detokenizer import IncrementalDetokenizer


def run(tokenizer, text, stop=()):
    ids = tokenizer.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tokenizer, tuple(stop))
    out = []
    for t in ids:
        delta, hit = d.add(t)
        out.append(delta)
        if hit:
            return out, True
    out.append(d.flush())
    return out, False


def test_roundtrip_never_splits_multibyte(tiny_tokenizer):
    text = "Grüße 日本語 🚀 the model"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split()), "the text spans several tokens"
    deltas, _ = run(tiny_tokenizer, text)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_byte_split_characters_wait_for_completion(tiny_tokenizer):
    # The emoji is several byte-level tokens; nothing is emitted until it is whole.
    ids = tiny_tokenizer.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1
    d = IncrementalDetokenizer(tiny_tokenizer)
    deltas = [d.add(t)[0] for t in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "🙂"


def test_stop_string_cut_exactly_across_tokens(tiny_tokenizer):
    deltas, hit = run(tiny_tokenizer, "the model serves tokens across ranks", stop=["s acr"])
    assert hit and "".join(deltas) == "the model serves token"


def test_earliest_stop_wins_and_never_leaks(tiny_tokenizer):
    deltas, hit = run(tiny_tokenizer, "requests arrive stream and finish", stop=["finish", "rive"])
    assert hit and "".join(deltas) == "requests ar"
    assert not any("rive" in d for d in deltas)


def test_no_stop_flushes_holdback(tiny_tokenizer):
    deltas, hit = run(tiny_tokenizer, "the gang keeps", stop=["zzzz"])
    assert not hit and "".join(deltas) == "the gang keeps"


def test_flush_keeps_an_unfinished_character(tiny_tokenizer):
    ids = tiny_tokenizer.encode("ab 🙂", add_special_tokens=False)[:-1]  # cut inside the emoji's bytes
    d = IncrementalDetokenizer(tiny_tokenizer)
    text = "".join(d.add(t)[0] for t in ids) + d.flush()
    assert text == tiny_tokenizer.decode(ids) and text.endswith("\ufffd")


def test_include_stop_str_keeps_the_stop_string_and_nothing_after(tiny_tokenizer):
    """vLLM's include_stop_str_in_output: the text ends with the stop string that ended it, even across tokens."""
    ids = tiny_tokenizer.encode("the model serves tokens across ranks", add_special_tokens=False)
    d = IncrementalDetokenizer(tiny_tokenizer, ("s acr", "ranks"), include_stop_str=True)
    out, hit = [], False
    for t in ids:
        delta, hit = d.add(t)
        out.append(delta)
        if hit:
            break
    assert hit and "".join(out) == "the model serves tokens acr"


def test_special_tokens_are_skipped_unless_asked(tiny_tokenizer):
    ids = tiny_tokenizer.encode("<|user|>the model</s>", add_special_tokens=False)
    assert tiny_tokenizer.eos_token_id in ids

    def text(**kw):
        d = IncrementalDetokenizer(tiny_tokenizer, **kw)
        return "".join(d.add(t)[0] for t in ids) + d.flush()

    assert text() == "the model" and text(skip_special_tokens=False) == "<|user|>the model</s>"
