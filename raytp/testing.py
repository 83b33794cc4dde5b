"""A gang without a model, for testing everything above the executor in seconds.

``ScriptedExecutor`` keeps the ``raytp.engine.protocol.Executor`` contract with no Ray, no torch and no
weights: each row's tokens are played back from a script keyed by the prompt's first token, or else are a
deterministic function of (prompt, position, seed), so a greedy request gives the same tokens alone or in
any batch, and seeded sampling is reproducible. Delays and failures are scripted.

``scripted_engine_factory(...)`` plugs it under the real ``Engine`` (scheduler, detokenizer, stop strings,
queue bound, metrics hooks) through the server's ``engine_factory`` seam, so the Serve layer (HTTP, SSE,
errors, auth, admission, disconnects, handles, metrics) is tested without starting a gang.
"""

from __future__ import annotations

import asyncio
import hashlib
import os

from raytp.errors import EngineDeadError
from raytp.gang.requests import RankRequests
from raytp.messages import LoadReport, StepInput, StepOutput


class ScriptedExecutor:
    """``Executor`` with scripted tokens and a fake paged KV cache.

    Like a rank, it stores each computed token in the KV slot the step's block table names, and reads a row's
    context back from its blocks, so wrong block tables (a bad prefix share, a lost block) change the tokens.
    A sampled token is ``scripts[context[0]]`` (its n-th entry for the row's n-th token; the last one repeats),
    else a hash of (context, seed) into ``token_ids``: a greedy request gives the same tokens alone or in any
    batch, and seeded sampling is reproducible. ``step_delay_s``: each step's duration. ``fail_after_steps``:
    the step after that many fails as a dead gang. ``fail_prompt``: a row whose context starts with these ids
    kills the gang ``fail_prompt_after`` steps after it was first computed. ``num_kv_blocks``: the blocks each
    "rank" reports."""

    def __init__(self, token_ids: list[int] | None = None, *, scripts: dict[int, list[int]] | None = None,
                 step_delay_s: float = 0.0, start_delay_s: float = 0.0, fail_after_steps: int | None = None,
                 fail_prompt: tuple[int, ...] | None = None, fail_prompt_after: int = 2, world_size: int = 1,
                 num_kv_blocks: int = 4096, block_size: int = 16):
        self.token_ids = token_ids or list(range(10, 100))
        self.scripts = scripts or {}
        self.step_delay_s = step_delay_s
        self.start_delay_s = start_delay_s
        self.fail_after_steps = fail_after_steps
        self.fail_prompt = tuple(fail_prompt) if fail_prompt else None
        self.fail_prompt_after = fail_prompt_after
        self.world_size = world_size
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.steps: list[str] = []  # "prefill" (some row computes several tokens) | "decode" | "release"
        self.slots: dict[int, int] = {}  # KV slot -> the token computed there
        self.requests = RankRequests()  # what a rank keeps of each live sequence, from the steps' deltas
        self._fuse: int | None = None  # steps left before a scripted failure
        self._dead: str | None = None
        self.shut = False

    async def start(self) -> list[LoadReport]:
        await asyncio.sleep(self.start_delay_s)
        return [LoadReport(rank=r, load_s=self.start_delay_s, peak_rss_mb=0.0, rss_mb=0.0, num_params=0,
                           num_kv_blocks=self.num_kv_blocks, kv_block_bytes=self.block_size,
                           kv_block_size=self.block_size)
                for r in range(self.world_size)]

    async def step(self, step: StepInput) -> StepOutput:
        if self._dead:
            raise EngineDeadError(f"TP gang is dead: {self._dead}")
        kind = "release" if not step.rows else "prefill" if any(len(r.token_ids) > 1 for r in step.rows) else "decode"
        self.steps.append(kind)
        await asyncio.sleep(self.step_delay_s)  # 0: still yields to the event loop, as a real step would
        if self._fuse is not None:
            self._fuse -= 1
        if (self.fail_after_steps is not None and len(self.steps) > self.fail_after_steps) or self._fuse == 0:
            self._dead = "rank 1: scripted failure"
            raise EngineDeadError(f"TP gang is dead: {self._dead}")
        rows = self.requests.apply(step)
        self.requests.take_table_writes()  # a rank mirrors them into its device tables; the script reads rows
        tokens, logprobs = [], []
        for r in rows:
            bs = self.block_size
            slot = lambda p: r.block_table[p // bs] * bs + p % bs  # noqa: E731
            for i, t in enumerate(r.token_ids):
                self.slots[slot(r.start_pos + i)] = t
            if not r.sample:
                continue
            context = tuple(self.slots[slot(p)] for p in range(r.start_pos + len(r.token_ids)))
            if self.fail_prompt and context[:len(self.fail_prompt)] == self.fail_prompt and self._fuse is None:
                self._fuse = self.fail_prompt_after
            tokens.append(self._next_token(r, context))
            logprobs.append(self._logprob(r, tokens[-1]))
        self.requests.record_sampled([r.slot for r in rows if r.sample], tokens)  # async scheduling's next inputs
        prompt = tuple(self._prompt_logprobs(r) for r in rows if r.prompt_targets)
        return StepOutput(tuple(tokens), tuple(logprobs) if any(logprobs) else (), prompt)

    @staticmethod
    def _prompt_logprobs(row):
        """Scripted prompt logprobs (echo): -1 for every prompt token this chunk scores (rank 1), no other
        alternatives."""
        k = row.params.prompt_logprobs
        return row.seq_id, row.start_pos + 1, tuple((-1.0, ((t, -1.0),)[:k], 1) for t in row.prompt_targets)

    def _logprob(self, row, token: int):
        """A scripted distribution for logprobs requests: the sampled token at -0.5, then the next vocabulary
        entries of ``token_ids`` at -1, -2, ...; an alternative the row's mask excludes (structured output,
        allowed_token_ids) at -inf, as a masked sampler reports it."""
        n = row.params.logprobs
        if n is None:
            return None
        i = self.token_ids.index(token) if token in self.token_ids else 0
        alternatives = [token] + [self.token_ids[(i + k) % len(self.token_ids)] for k in range(1, n)]
        return -0.5, tuple((t, -0.5 if k == 0 else -float(k) if _allowed(row, t) else float("-inf"))
                           for k, t in enumerate(alternatives[:n])), 1

    def _next_token(self, row, context: tuple[int, ...]) -> int:
        i = len(context) - row.num_prompt_tokens  # this is the sequence's i-th output token
        script = self.scripts.get(context[0])
        if script is not None:
            return script[min(i, len(script) - 1)]
        seed = 0 if row.params.greedy else row.params.seed
        digest = hashlib.blake2b(repr((context, seed)).encode(), digest_size=8).digest()
        start = int.from_bytes(digest, "little") % len(self.token_ids)
        if row.params.allowed_token_ids:  # the first allowed token from the hashed place on, as a mask would give
            order = self.token_ids[start:] + self.token_ids[:start]
            return next((t for t in order if t in row.params.allowed_token_ids), row.params.allowed_token_ids[0])
        if row.allowed is None:
            return self.token_ids[start]
        # structured output: the first allowed token from the hashed place on, as a masked sampler would pick
        words = [int.from_bytes(row.allowed[i:i + 4], "little") for i in range(0, len(row.allowed), 4)]
        ok = [t for t in range(32 * len(words)) if words[t // 32] >> (t % 32) & 1]
        order = self.token_ids[start:] + self.token_ids[:start]
        return next((t for t in order if t < 32 * len(words) and words[t // 32] >> (t % 32) & 1), ok[0])

    async def pids(self) -> list[int]:
        return [os.getpid()] * self.world_size

    async def probe(self) -> None:
        if self._dead:
            raise EngineDeadError(f"scripted gang is dead: {self._dead}")

    def shutdown(self) -> None:
        self.shut = True
        self._dead = self._dead or "shut down"


def _allowed(row, token: int) -> bool:
    """Whether ``token`` passes the row's masks: its allowed_token_ids and its grammar's bitmask."""
    if row.params.allowed_token_ids and token not in row.params.allowed_token_ids:
        return False
    if row.allowed is None:
        return True
    word = token // 32
    return word < len(row.allowed) // 4 and bool(int.from_bytes(row.allowed[4 * word:4 * word + 4], "little")
                                                 >> (token % 32) & 1)


def plain_token_ids(tokenizer) -> list[int]:
    """Ids of the tokenizer's ordinary tokens (no special tokens), for scripted outputs that never hit EOS."""
    special = set(tokenizer.all_special_ids)
    return [i for i in range(len(tokenizer)) if i not in special]


def scripted_engine_factory(*, step_delay_s: float = 0.0, start_delay_s: float = 0.0,
                            fail_prompt: str | None = None, fail_prompt_after: int = 2, num_kv_blocks: int = 4096):
    """An ``engine_factory`` for ``raytp.serve.app.bind_app``: the real ``Engine`` over a ``ScriptedExecutor``.

    ``fail_prompt``: a completion prompt starting with this text kills the replica's "gang"
    ``fail_prompt_after`` steps after it started (as a dead rank would). ``num_kv_blocks``: the KV blocks each
    "rank" reports (block 0 is the null block)."""

    def factory(config, tokenizer, stats):
        from raytp.engine.engine import make_engine

        fail = tuple(tokenizer.encode(fail_prompt)) if fail_prompt else None
        executor = ScriptedExecutor(plain_token_ids(tokenizer), step_delay_s=step_delay_s,
                                    start_delay_s=start_delay_s, fail_prompt=fail, fail_prompt_after=fail_prompt_after,
                                    world_size=config.tensor_parallel_size, block_size=config.block_size,
                                    num_kv_blocks=num_kv_blocks)
        return make_engine(config, executor, tokenizer, stats)

    return factory


def slow_worker_cls(layer_delay_s: float):
    """A ``raytp.gang.worker.Worker`` whose every decoder layer first sleeps ``layer_delay_s``, as a slow host
    computes (the sleep releases the GIL, like a torch kernel): for ``RayExecutor(config, worker_cls=...)`` in
    tests of slow-is-not-dead."""
    import time

    from raytp.gang.model_runner import decoder_layers
    from raytp.gang.worker import Worker

    class SlowWorker(Worker):
        def load_model(self):
            report = super().load_model()
            for layer in decoder_layers(self.runner.model):
                layer.register_forward_pre_hook(lambda *_: time.sleep(layer_delay_s))
            return report

    return SlowWorker
