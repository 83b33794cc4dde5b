"""Drive an executor directly, step by step, for one fixed batch (microbenchmarks of the gang without the
engine's scheduler): each row gets its own contiguous KV blocks, all rows prefill in one step, then decode."""

from __future__ import annotations

from raytp.messages import NewRequest, RowInput, SamplingParams, StepInput


class DirectBatch:
    def __init__(self, executor, prompts: list[tuple[int, ...]], params: SamplingParams, *, block_size: int = 16,
                 tag: str = "b"):
        self.executor = executor
        self.params = params
        per_row = -(-(max(len(p) for p in prompts) + params.max_tokens + 1) // block_size)
        self.rows = [(f"{tag}{i}", list(p), tuple(range(1 + i * per_row, 1 + (i + 1) * per_row)))
                     for i, p in enumerate(prompts)]
        self.computed = [0] * len(prompts)

    async def step(self) -> tuple[int, ...]:
        """Compute every row's pending tokens (whole prompts first, then one token each); return the new tokens."""
        new = () if any(self.computed) else tuple(NewRequest(sid, i, self.params.for_ranks(), len(toks), table)
                                                  for i, (sid, toks, table) in enumerate(self.rows))
        rows = [RowInput(i, tuple(toks[c:]), c, True) for i, ((_, toks, _), c) in enumerate(zip(self.rows,
                                                                                             self.computed))]
        out = await self.executor.step(StepInput(new, tuple(rows)))
        for i, ((_, toks, _), token) in enumerate(zip(self.rows, out.tokens)):
            self.computed[i] = len(toks)
            toks.append(token)
        return out.tokens

    async def release(self) -> None:
        await self.executor.step(StepInput(finished=tuple(range(len(self.rows)))))
