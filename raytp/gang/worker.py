"""One rank of a gang. A cheap constructor, then explicit init phases, then ``step``.

Phases, called by the executor on every rank: ``init_device`` (check the device, env vars,
threads; Ray has already set device visibility) → ``init_distributed`` (join the process
group) → ``load_model`` (shard on this rank's device) → ``step`` (one ``StepInput`` each).
"""

from __future__ import annotations

import logging
import os
import socket
import time

import ray

from raytp import accelerator
from raytp.config import ResolvedConfig
from raytp.gang.report import load_report, memory_stats
from raytp.messages import LoadReport, StepInput, StepOutput

logger = logging.getLogger(__name__)


class Worker:
    """A rank. Methods are the gang's verbs; the executor calls them identically on every rank."""

    def __init__(self, rank: int, config: ResolvedConfig):
        self.rank = rank
        self.config = config
        self.accel = accelerator.get(config.device)
        self.runner = None

    @ray.method(concurrency_group="liveness")
    def pid(self) -> int:
        return os.getpid()

    @ray.method(concurrency_group="liveness")
    def ping(self) -> int:
        """The number of decoder layers this rank has run so far. Answered from the actor's second thread, also
        while ``step`` runs in the first (torch releases the GIL in its kernels and collectives): a slow rank
        answers with a growing count, a hung one with the same count, a stopped one not at all."""
        return self.runner.progress if self.runner is not None else 0

    def node_address(self) -> tuple[str, int]:
        """Rank 0's rendezvous address: this node's IP and a port free right now."""
        ip = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return ip, s.getsockname()[1]

    def init_device(self, master_addr: str, master_port: int) -> None:
        """Raises ``ConfigError`` if torch cannot use the configured device here."""
        from raytp.logs import configure_rank_logging

        configure_rank_logging(self.rank, self.config.tensor_parallel_size)
        self.accel.check_available()
        threads = max(1, int(self.config.num_cpus_per_worker))
        os.environ.update(self.accel.worker_env(
            rank=self.rank, world_size=self.config.tensor_parallel_size,
            master_addr=master_addr, master_port=master_port, num_threads=threads,
        ))
        import torch

        if self.accel.name == "cpu" and os.environ.get("RAYTP_CPU_AFFINITY", "1") != "0":
            cores = self.accel.rank_cpus(self.rank, self.config.tensor_parallel_size, threads,
                                         sorted(os.sched_getaffinity(0)))
            if cores:  # before torch starts its OpenMP threads: they inherit this thread's mask
                os.sched_setaffinity(0, cores)
        torch.set_num_threads(threads)
        if self.accel.name != "cpu":
            getattr(torch, self.accel.name).set_device(self.accel.torch_device())

    def init_distributed(self) -> None:
        if self.config.tensor_parallel_size == 1:
            return  # a single rank needs no process group
        import torch.distributed as dist

        from raytp.gang import loader

        loader.init_distributed(
            self.accel.backend(), os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
            self.rank, self.config.tensor_parallel_size, self.config.step_timeout_s,
        )
        # DeepSpeed's CPU shm all-reduce maps every rank's /dev/shm buffer during init and never unlinks them,
        # so a gang that is killed (SIGKILL, SIGTERM to `serve run`, a crash) would leak them (RAM). Once every
        # rank is past init (the barrier), every mapping exists: unlinking the names now frees the memory
        # whenever the processes end, however they end.
        dist.barrier()
        for path in loader.shm_buffer_paths(os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], self.rank):
            os.unlink(path)

    def load_model(self) -> LoadReport:
        from raytp.gang import loader
        from raytp.gang.model_runner import ModelRunner

        start = time.perf_counter()
        device = self.accel.torch_device()
        model = loader.load_shard(self.config, self.rank, device)
        self.runner = ModelRunner.for_config(model, self.config, self.rank, device)
        return load_report(self.rank, start, model, self.runner)

    def step(self, step: StepInput) -> StepOutput:
        """Apply one engine step to this rank's rows; rank 0's output carries the sampled tokens."""
        return self.runner.step(step)

    @ray.method(concurrency_group="liveness")  # answered during a long step too
    def memory_stats(self) -> dict:
        """Host memory of this rank now: RSS, PSS (shared pages split among sharers) and peak RSS, in MB."""
        return memory_stats(self.rank)
