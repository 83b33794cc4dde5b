"""A one-rank gang in the calling process, with no Ray: for benchmarks and for machines without Ray
(``benchmarks/engine.py`` on a lent GPU). Same ``Executor`` contract as ``RayExecutor``; TP=1 only.

``model`` may be given already built (e.g. a random-weight model made directly on the device); else the
config's checkpoint is loaded with ``raytp.gang.loader`` as a rank would. Steps run on one dedicated thread,
so the event loop streams tokens to callers while the next step computes, as it does with Ray.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor

from raytp import accelerator
from raytp.config import ResolvedConfig
from raytp.errors import ConfigError, EngineDeadError
from raytp.messages import LoadReport, StepInput, StepOutput


class LocalExecutor:
    def __init__(self, config: ResolvedConfig, model=None):
        if config.tensor_parallel_size != 1:
            raise ConfigError("tensor_parallel_size", "the in-process executor runs one rank; use RayExecutor for TP")
        self.config = config
        self.model = model
        self.runner = None
        self._dead: str | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="raytp-rank0")

    async def start(self) -> list[LoadReport]:
        from raytp.gang import loader
        from raytp.gang.model_runner import ModelRunner
        from raytp.gang.report import load_report

        accel = accelerator.get(self.config.device)
        accel.check_available()
        start = time.perf_counter()
        device = accel.torch_device()
        model = self.model if self.model is not None else loader.load_shard(self.config, 0, device)
        self.runner = ModelRunner.for_config(model, self.config, 0, device)
        return [load_report(0, start, model, self.runner)]

    async def step(self, step: StepInput) -> StepOutput:
        if self._dead:
            raise EngineDeadError(f"executor is {self._dead}")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, self.runner.step, step)
        except Exception as e:  # noqa: BLE001 - the engine turns this into failed requests, never a hang
            self._dead = f"failed: {type(e).__name__}: {e}"
            raise EngineDeadError(f"executor {self._dead}") from e

    async def pids(self) -> list[int]:
        return [os.getpid()]

    async def memory_stats(self) -> list[dict]:
        from raytp.gang.report import memory_stats

        return [memory_stats(0)]

    def shutdown(self) -> None:
        self._dead = self._dead or "shut down"
        self.runner = None
        self._thread.shutdown(wait=False)
