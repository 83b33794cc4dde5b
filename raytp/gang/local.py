"""A one-rank gang in the calling process, with no Ray: for benchmarks and for machines without Ray
(``benchmarks/engine.py`` on a lent GPU). Same ``Executor`` contract as ``RayExecutor``, the same ``Worker``
(one load path); TP=1 only.

``model`` may be given already built (e.g. a random-weight model made directly on the device); else the
config's checkpoint is loaded by the worker as a rank would. Steps run on one dedicated thread, so the engine
core's loop takes requests and finishes the step before while the next one computes, as it does with Ray.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from raytp.config import ResolvedConfig
from raytp.errors import ConfigError, EngineDeadError
from raytp.gang.worker import Worker
from raytp.messages import LoadReport, StepInput, StepOutput


class LocalExecutor:
    def __init__(self, config: ResolvedConfig, model=None):
        if config.tensor_parallel_size != 1:
            raise ConfigError("tensor_parallel_size", "the in-process executor runs one rank; use RayExecutor for TP")
        self.config = config
        self.model = model
        self.worker = Worker(0, config)
        self._dead: str | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="raytp-rank0")

    @property
    def runner(self):
        return self.worker.runner

    async def start(self) -> list[LoadReport]:
        # not init_device: that sets a rank's process environment and threads, and this process is the caller's
        self.worker.platform.check_available()
        # loaded on the step thread, as a rank loads and steps on one thread: on a CPU, OpenMP keeps a thread pool
        # per calling thread, and with a second pool (more OpenMP threads than cores) libgomp stops spinning
        # between parallel regions (measured: a 0.5B's batch-1 step 53 ms instead of 26 on 2 cores)
        report = await asyncio.get_running_loop().run_in_executor(self._thread, self.worker.load_model, self.model)
        self.model = None  # the runner holds it now
        return [report]

    async def step(self, step: StepInput) -> StepOutput:
        if self._dead:
            raise EngineDeadError(f"executor is {self._dead}")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, self._step, step)
        except Exception as e:  # noqa: BLE001 - the engine turns this into failed requests, never a hang
            self._dead = f"failed: {type(e).__name__}: {e}"
            raise EngineDeadError(f"executor {self._dead}") from e

    def _step(self, step: StepInput) -> StepOutput:
        # async scheduling queues the next step before this one ends: once a step failed, the rank's state is
        # not what the queued one assumes, so it must not run
        if self._dead:
            raise EngineDeadError(f"executor is {self._dead}")
        return self.worker.step(step)

    async def probe(self) -> None:
        if self._dead:
            raise EngineDeadError(f"executor is {self._dead}")

    async def pids(self) -> list[int]:
        return [self.worker.pid()]

    def shutdown(self) -> None:
        self._dead = self._dead or "shut down"
        self.worker.runner = None
        self._thread.shutdown(wait=False)
