"""One rank of a gang, free of Ray. A cheap constructor, then explicit init phases, then ``step``.

Phases, called by the executor on every rank: ``init_device`` (check the device, env vars, threads; Ray has
already set device visibility) → ``init_distributed`` (join the process group) → ``load_model`` (shard on this
rank's device) → ``step`` (one ``StepInput`` each). ``RayExecutor`` runs it as a Ray actor (``ray_worker_cls``
adds the liveness thread and the rendezvous address); ``LocalExecutor`` runs the same class in process.
"""

from __future__ import annotations

import logging
import os
import time

from raytp import platforms
from raytp.config import ResolvedConfig
from raytp.gang.report import load_report, memory_stats
from raytp.messages import LoadReport, StepInput, StepOutput

logger = logging.getLogger(__name__)


class Worker:
    """A rank. Methods are the gang's verbs; the executor calls them identically on every rank."""

    def __init__(self, rank: int, config: ResolvedConfig):
        self.rank = rank
        self.config = config
        self.platform = platforms.get(config.device)
        self.runner = None

    def pid(self) -> int:
        return os.getpid()

    def ping(self) -> int:
        """The number of decoder layers this rank has run so far. Answered from another thread, also while ``step``
        runs (torch releases the GIL in its kernels and collectives): a slow rank answers with a growing count, a
        hung one with the same count, a stopped one not at all."""
        return self.runner.progress if self.runner is not None else 0

    def init_device(self, master_addr: str = "127.0.0.1", master_port: int = 0) -> None:
        """Raises ``ConfigError`` if torch cannot use the configured device here."""
        from raytp.logs import configure_rank_logging

        configure_rank_logging(self.rank, self.config.tensor_parallel_size)
        self.platform.check_available()
        threads = max(1, int(self.config.num_cpus_per_worker))
        world_size = self.config.tensor_parallel_size
        os.environ.update(self.platform.worker_env(rank=self.rank, world_size=world_size, master_addr=master_addr,
                                                   master_port=master_port, num_threads=threads))
        self.platform.init_rank(self.rank, world_size, threads)

    def init_distributed(self) -> None:
        if self.config.tensor_parallel_size == 1:
            return  # a single rank needs no process group
        import torch.distributed as dist

        from raytp.gang import loader

        loader.init_distributed(
            self.platform.backend(), os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
            self.rank, self.config.tensor_parallel_size, self.config.step_timeout_s,
        )
        # DeepSpeed's CPU shm all-reduce maps every rank's /dev/shm buffer during init and never unlinks them,
        # so a gang that is killed (SIGKILL, SIGTERM to `serve run`, a crash) would leak them (RAM). Once every
        # rank is past init (the barrier), every mapping exists: unlinking the names now frees the memory
        # whenever the processes end, however they end.
        dist.barrier()
        for path in loader.shm_buffer_paths(os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], self.rank):
            os.unlink(path)

    def load_model(self, model=None) -> LoadReport:
        """Load this rank's shard (or take ``model``, already built on the device: benchmarks' random models) and
        build its runner (KV pool, attention backend, graphs)."""
        from raytp.gang import loader
        from raytp.gang.model_runner import ModelRunner

        start = time.perf_counter()
        device = self.platform.torch_device()
        if model is None:
            model = loader.load_shard(self.config, self.rank, device)
        self.runner = ModelRunner.for_config(model, self.config, self.rank, device)
        return load_report(self.rank, start, model, self.runner)

    def step(self, step: StepInput) -> StepOutput:
        """Apply one engine step to this rank's rows; rank 0's output carries the sampled tokens."""
        return self.runner.step(step)

    def serve_steps(self, path: str) -> None:
        """Take steps from the driver's step channel at ``path`` (``raytp.gang.channel``), each through ``step``,
        until the driver closes it: returns only then (call it on the thread that loaded the model)."""
        from raytp.gang.channel import serve_rank

        serve_rank(path, self.rank, self.step)

    def memory_stats(self) -> dict:
        """Host memory of this rank now: RSS, PSS (shared pages split among sharers) and peak RSS, in MB."""
        return memory_stats(self.rank)
