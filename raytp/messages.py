"""Typed messages across the engine ⇄ gang seam: plain, picklable dataclasses, no torch, no Ray.

The engine sends every rank the same ``StepInput``; rank 0 answers with a ``StepOutput``.
What ranks need of a request travels once, when it joins their batch (``NewRequest``); each step then
carries only what changed: the tokens to compute, new blocks, who left (vLLM v1's new / cached request
data). The driver's scheduler still owns every allocation decision (the paged KV cache); ranks never
allocate, they only record the tables they are told.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. ``temperature == 0`` means greedy; ``seed`` makes sampling reproducible."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    min_p: float = 0.0  # after temperature, tokens below min_p x the most likely one's probability are cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # OpenAI penalties (vLLM's semantics): presence / frequency over the output so far, repetition over prompt +
    # output (logit / p if positive, * p if negative); logit_bias: (token id, bias) added to the logits
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    # no EOS / stop token (and no stop-string check) before this many output tokens
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the sequence (their text is not returned)
    allowed_token_ids: tuple[int, ...] = ()  # if set, only these tokens may be sampled (a mask, like a grammar's)
    eos_token_ids: tuple[int, ...] = ()  # filled in by the engine: what min_tokens suppresses besides stop_token_ids
    # log-probabilities of each sampled token and of this many most likely alternatives (None: none), from the
    # distribution the token was drawn from: after logit_bias, penalties and temperature, before top-k / top-p
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (echo); no prefix reuse
    grammar: str | None = None  # structured output: an llguidance grammar the engine's matcher enforces
    # the engine's detokenizer only: special tokens' text dropped (vLLM's default); the stop string or stop token
    # that ended the sequence kept in its text
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def for_ranks(self) -> SamplingParams:
        """What ranks read: everything but the stop strings and the grammar (the engine applies those)."""
        return replace(self, stop=(), grammar=None) if self.stop or self.grammar else self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_history(self) -> bool:
        """Sampling this request reads its earlier tokens (penalties), so its rows carry them."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def adjusts_logits(self) -> bool:
        return self.needs_history or bool(self.logit_bias) or self.min_tokens > 0 or bool(self.allowed_token_ids)


@dataclass(frozen=True)
class NewRequest:
    """A sequence joining the ranks' batch — admitted, or re-admitted after preemption: what ranks keep of it until
    it leaves (``StepInput.finished``). Sent once; its steps' rows then name it by ``handle`` (a small number the
    engine reuses once the sequence has left) and carry only what changes. ``params``: as ranks see them
    (``SamplingParams.for_ranks``); ``history``: the tokens before its first computed one (a cached prefix), only if
    sampling reads them (``params.needs_history``)."""

    seq_id: str
    handle: int
    params: SamplingParams
    num_prompt_tokens: int
    block_table: tuple[int, ...]
    history: tuple[int, ...] = ()


# A row's input token that the driver has not seen yet: the token the ranks sampled for this sequence in the
# step before (async scheduling sends step N + 1 while step N runs). Every rank sampled it and kept it.
PENDING_TOKEN = -1


@dataclass(frozen=True)
class RowInput:
    """One sequence's share of a step: compute ``token_ids`` at positions ``start_pos ..``, writing their keys
    and values into the KV slots ``block_table[pos // block_size] * block_size + pos % block_size`` of the
    sequence's table (as the ranks hold it, after appending ``new_blocks``) and attending to every earlier
    position of the sequence. A decode row has one token (the last one sampled, or ``PENDING_TOKEN`` when the
    driver sent this step before that token came back); a prefill row a chunk of its
    prompt (or, after preemption, of prompt + output so far). ``sample``: this chunk reaches the sequence's end,
    so one token is sampled from its last position."""

    handle: int  # the sequence, as its NewRequest named it
    token_ids: tuple[int, ...]
    start_pos: int
    sample: bool
    new_blocks: tuple[int, ...] = ()  # blocks the driver gave the sequence since the ranks last saw it
    prompt_next: int | None = None  # prompt logprobs: the prompt token after this chunk, if the prompt goes on
    allowed: bytes | None = None  # structured output: packed int32 bitmask of the tokens allowed next (bit i = id i)


@dataclass(frozen=True)
class StepInput:
    """One engine step, identical for every rank: sequences that left since the last step (``finished``: handles
    of sequences ended, aborted or preempted; ranks drop what they kept of them first), sequences joining
    (``new_requests``), then one flat, unpadded forward over every row's tokens.

    Pickled (once per rank per step) as columns, not as row objects: a decode step of 16 rows is a few hundred
    bytes (``benchmarks/step_overhead.py``)."""

    new_requests: tuple[NewRequest, ...] = ()
    rows: tuple[RowInput, ...] = ()
    finished: tuple[int, ...] = ()

    def __reduce__(self):
        return _unpack_step, (self.new_requests, self.finished, *_pack_rows(self.rows))


def _pack_rows(rows: tuple[RowInput, ...]) -> tuple:
    """Rows as columns; what most rows share (one token, sampled, nothing sparse) costs nothing per row."""
    counts = None if all(len(r.token_ids) == 1 for r in rows) else tuple(len(r.token_ids) for r in rows)
    sample = None if all(r.sample for r in rows) else tuple(r.sample for r in rows)
    sparse = tuple(tuple((i, getattr(r, f)) for i, r in enumerate(rows) if getattr(r, f))
                   for f in ("new_blocks", "prompt_next", "allowed"))
    return (tuple(r.handle for r in rows), tuple(t for r in rows for t in r.token_ids), counts,
            tuple(r.start_pos for r in rows), sample, *sparse)


def _unpack_step(new_requests, finished, handles, tokens, counts, starts, sample, new_blocks, prompt_next, allowed):
    extra = [dict() for _ in handles]
    for name, pairs in (("new_blocks", new_blocks), ("prompt_next", prompt_next), ("allowed", allowed)):
        for i, value in pairs:
            extra[i][name] = value
    rows, at = [], 0
    for i, handle in enumerate(handles):
        n = 1 if counts is None else counts[i]
        rows.append(RowInput(handle, tokens[at:at + n], starts[i], True if sample is None else sample[i],
                             **extra[i]))
        at += n
    return StepInput(new_requests, tuple(rows), finished)


# (log-probability of the sampled token, ((token id, log-probability), ...) of the most likely alternatives,
# the token's rank: 1 + how many tokens are more likely; vLLM's prompt_logprobs report it)
TokenLogprob = tuple[float, tuple[tuple[int, float], ...], int]


@dataclass(frozen=True)
class StepOutput:
    """Rank 0's answer: one sampled token per row with ``sample`` set, in row order. Other ranks return ().
    ``logprobs``: empty unless a row asked; then one entry per sampled row (None for rows that did not ask)."""

    tokens: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob | None, ...] = ()
    # per row asking for prompt logprobs: (seq_id, position of its first entry, an entry per prompt token from there)
    prompt_logprobs: tuple[tuple[str, int, tuple[TokenLogprob, ...]], ...] = ()


@dataclass
class LoadReport:
    """What one rank reports after loading its shard and allocating its KV cache."""

    rank: int
    load_s: float
    peak_rss_mb: float
    rss_mb: float
    num_params: int
    num_kv_blocks: int = 0  # KV blocks this rank's budget holds (the engine uses the smallest over ranks)
    kv_block_bytes: int = 0  # bytes of one block on this rank (its share of heads, every layer, keys + values)
    kv_block_size: int = 16  # tokens per block
    weight_bytes: int = 0  # bytes of this rank's weights as stored (quantized ones packed)
    # how steps run: eager | cuda_graphs (raytp.gang.graph_runner) | compiled (raytp.gang.compiled: compile_model)
    decode_mode: str = "eager"
    decode_warm_up_s: float = 0.0  # start-up seconds spent capturing graphs (part of load_s)
    # start-up seconds spent compiling: the model step (compile_model) and attention kernels (the CPU decode
    # kernel); part of load_s
    compile_s: float = 0.0
    # compiled model-step graphs at start-up: compiled here, or loaded whole from the graph store (a restart,
    # raytp.gang.graph_store)
    graphs_compiled: int = 0
    graphs_loaded: int = 0
    attention_backend: str = "sdpa"  # raytp.gang.attention backend of this rank (legacy: transformers 4.x adapter)
