"""One OpenAI request → its choices on the engine: every prompt of a batched ``prompt`` list × ``n``.

Each choice is one engine request (``<request id>-<index>`` when there are several), all running concurrently,
so a list of prompts is batched by the engine like concurrent requests. The n choices of one prompt share its
KV blocks: choice 0 runs first, and its siblings are admitted once it has produced its first token, when its
prompt blocks are in the prefix cache, so they compute only the prompt's last partial block (without prefix
caching they start at once and each computes the prompt). Errors of any choice end the whole request, and
closing it aborts every choice still running.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from raytp.engine.protocol import EngineClient, RequestOutput
from raytp.messages import SamplingParams


@dataclass
class Choice:
    index: int  # OpenAI's choice index: prompt i, sample j of n → i * n + j
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    leader: int  # the index of this prompt's choice 0 (itself for choice 0)
    text: list[str] = field(default_factory=list)
    last: RequestOutput | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # TokenLogprob per token, when asked
    echo_text: str | None = None  # echo: the prompt's (chat: the assistant's last message's) text, returned first
    echo_logprobs: int | None = None  # a completion's echo with logprobs: alternatives per prompt token
    prompt_logprobs: list | None = None  # the engine's entries for prompt tokens 1.. (echo, prompt_logprobs)
    drop_output: bool = False  # max_tokens 0 with echo: one token is generated (the engine always samples) and hidden

    @property
    def num_output_tokens(self) -> int:
        return 0 if self.drop_output or self.last is None else self.last.num_output_tokens


class Fanout:
    def __init__(self, engine: EngineClient, request_id: str, choices: list[Choice], share_prefill: bool):
        self.engine = engine
        self.request_id = request_id
        self.choices = choices
        self._started = {c.index: asyncio.Event() for c in choices if c.index == c.leader}
        self._share = share_prefill

    def engine_id(self, c: Choice) -> str:
        return self.request_id if len(self.choices) == 1 else f"{self.request_id}-{c.index}"

    async def stream(self):
        """Yield (choice, delta) as any choice produces text, until all have finished."""
        if len(self.choices) == 1:  # one choice: the engine's own stream, no task or queue hop per token
            c = self.choices[0]
            gen = self.engine.generate(self.engine_id(c), c.prompt_ids, c.params)
            try:
                async for out in gen:
                    self._record(c, out)
                    yield c, out
            finally:
                await gen.aclose()  # a consumer that stops early aborts the request
            return
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(c, queue)) for c in self.choices]
        try:
            remaining = len(tasks)
            while remaining:
                c, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    self._record(c, item)
                    yield c, item
        finally:
            for t in tasks:
                t.cancel()  # each engine generator's cleanup aborts its request
            await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    def _record(c: Choice, out: RequestOutput) -> None:
        c.text.append(out.text)
        c.last = out
        c.token_ids += out.token_ids
        c.logprobs += out.logprobs or []
        if out.prompt_logprobs is not None:
            c.prompt_logprobs = out.prompt_logprobs

    async def collect(self) -> list[Choice]:
        async for _ in self.stream():
            pass
        return self.choices

    def usage(self) -> tuple[int, int]:
        """(prompt tokens, each prompt counted once; completion tokens of every choice)."""
        prompts = sum(len(c.prompt_ids) for c in self.choices if c.index == c.leader)
        return prompts, sum(c.num_output_tokens for c in self.choices)

    async def _pump(self, c: Choice, queue: asyncio.Queue) -> None:
        started = self._started.get(c.index)
        try:
            if started is None and self._share:
                await self._started[c.leader].wait()
            async for out in self.engine.generate(self.engine_id(c), c.prompt_ids, c.params):
                if started is not None:
                    started.set()
                await queue.put((c, out))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which ends the request with it
            await queue.put((c, e))
        finally:
            if started is not None:
                started.set()  # siblings never wait on a leader that failed or finished
            queue.put_nowait((c, None))
