"""The gang: one Ray actor per placement-group bundle, one process group, one typed verb.

``RayExecutor`` creates the workers in the caller's placement group (a Serve replica's
own, or one it makes when run outside Serve), walks them through their init phases,
then sends every rank the same ``StepInput`` and returns rank 0's ``StepOutput`` (over the step channel,
``raytp.gang.channel``, Unix sockets, where the ranks share the driver's node; else as actor calls). Any
failure — a dead actor, an unresponsive rank, a worker exception — marks the executor
dead for good: a broken process group is never retried; the replica is replaced as a unit.

Slow is not dead: a step may take as long as the hardware needs (a long prefill on a slow
CPU). While it runs, the executor pings every rank (answered by a second thread of the
rank's actor, so a rank busy in a forward or a collective still answers) with the count
of decoder layers it has run. A rank that does not answer within ``step_timeout_s``
(stopped, gone), or whose count has not moved for ``step_timeout_s`` (hung in a
collective or a driver), fails the gang. So ``step_timeout_s`` bounds one decoder layer's
time, not a whole step's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

import ray
from ray.exceptions import RayError
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raytp import platforms
from raytp.config import ResolvedConfig
from raytp.errors import ConfigError, EngineDeadError
from raytp.gang.channel import StepChannel, retrieve
from raytp.gang.worker import Worker
from raytp.messages import LoadReport, StepInput, StepOutput

logger = logging.getLogger(__name__)


class _Timeout(Exception):
    """A wait for the ranks ran out (as opposed to a rank raising TimeoutError itself)."""


def ray_worker_cls(worker_cls=Worker):
    """``worker_cls`` as a Ray actor class, a thin wrapper: the liveness verbs run on a second thread (the
    "liveness" concurrency group), so a rank busy in a forward or a collective still answers; rank 0 gives the
    gang's rendezvous address as Ray knows its node. Once the step channel is open, ``serve_steps`` holds the
    default group's one thread for good: a method called after start-up belongs to the liveness group."""

    class Worker(worker_cls):  # the name Ray shows in process titles: ray::Worker
        @ray.method(concurrency_group="liveness")
        def pid(self) -> int:
            return super().pid()

        @ray.method(concurrency_group="liveness")
        def ping(self) -> int:
            return super().ping()

        @ray.method(concurrency_group="liveness")  # answered during a long step too
        def memory_stats(self) -> dict:
            return super().memory_stats()

        def node_id(self) -> str:
            return ray.get_runtime_context().get_node_id()

        def node_address(self) -> tuple[str, int]:
            """Rank 0's rendezvous address: this node's IP and a port free right now."""
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("", 0))
                return ray.util.get_node_ip_address(), s.getsockname()[1]

    return ray.remote(concurrency_groups={"liveness": 1})(Worker)


class RayExecutor:
    """``raytp.engine.protocol.Executor`` over Ray actors."""

    # While a step runs, ranks are pinged this often (more often when step_timeout_s is shorter).
    LIVENESS_PERIOD_S = 2.0

    def __init__(self, config: ResolvedConfig, worker_cls=Worker):
        self.config = config
        self.worker_cls = worker_cls  # tests substitute a slow worker
        self.workers: list = []
        self._own_pg = None
        self._dead_reason: str | None = None
        self._rendezvous: tuple[str, int] | None = None
        self._channel: StepChannel | None = None  # steps over Unix sockets, once the gang has loaded
        self._serving: asyncio.Future | None = None  # the ranks' serve_steps calls (they end with the channel)

    @property
    def world_size(self) -> int:
        return self.config.tensor_parallel_size

    async def start(self) -> list[LoadReport]:
        """Create, connect and load the gang. Raises ``ConfigError`` if a rank finds the config cannot work on
        its node (e.g. no such device), ``EngineDeadError`` if any phase fails or times out."""
        cfg = self.config
        bundle = platforms.get(cfg.device).bundle(cfg.num_cpus_per_worker)  # one rank's resources, the platform's
        pg = get_current_placement_group()
        if pg is None:  # outside Serve (tests, benchmarks): make the group a Serve replica would own
            pg = self._own_pg = placement_group([bundle] * self.world_size, strategy=cfg.placement_strategy)
        actor_cls = ray_worker_cls(self.worker_cls)
        extra = dict(bundle)  # each rank's actor takes its whole bundle, whatever the platform puts in it
        num_cpus, num_gpus = extra.pop("CPU", 0), extra.pop("GPU", 0)
        # 1. One actor per bundle, pinned to it.
        self.workers = [
            actor_cls.options(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                resources=extra or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=rank,
                    placement_group_capture_child_tasks=True,
                ),
                max_restarts=0,  # a restarted rank could never rejoin the process group
            ).remote(rank, cfg)
            for rank in range(self.world_size)
        ]
        timeout = cfg.worker_start_timeout_s
        try:
            # 2. Rank 0 publishes its address and a free port; 3. every rank checks its device, sets its env.
            addr, port = await self._wait([self.workers[0].node_address.remote()], timeout, "rendezvous")
            self._rendezvous = (addr, port)
            await self._wait([w.init_device.remote(addr, port) for w in self.workers], timeout, "init_device")
            # 4. All ranks join the process group together (it blocks until all have).
            await self._wait([w.init_distributed.remote() for w in self.workers], timeout, "init_distributed")
            # 5. Load: AutoTP's init is collective, so all ranks load at once.
            reports = await self._wait([w.load_model.remote() for w in self.workers], timeout, "load_model",
                                       all_results=True)
            # 6. Steps through the step channel where every rank shares this node.
            await self._open_channel(timeout)
            return reports
        except BaseException:
            self.shutdown()
            raise

    async def _open_channel(self, timeout_s: float) -> None:
        """Steps over Unix sockets (``raytp.gang.channel``) instead of an actor call per rank per step, where every
        rank runs on this node and ``RAYTP_STEP_CHANNEL`` is not 0."""
        if os.environ.get("RAYTP_STEP_CHANNEL", "1") == "0":
            return
        here = ray.get_runtime_context().get_node_id()
        nodes = await self._wait([w.node_id.remote() for w in self.workers], timeout_s, "node_id", all_results=True)
        if any(node != here for node in nodes):
            logger.info("the gang's ranks run on another node than its driver: steps go as Ray actor calls")
            return
        channel = StepChannel(self.world_size)
        path = channel.listen()
        # each rank's call runs its end of the channel until the channel closes (or the rank dies): not awaited here,
        # its outcome taken when it ends so that Ray does not report it as unhandled
        self._serving = asyncio.ensure_future(asyncio.gather(*[w.serve_steps.remote(path) for w in self.workers]))
        self._serving.add_done_callback(retrieve)
        accept = asyncio.ensure_future(channel.accept())
        accept.add_done_callback(retrieve)
        try:
            await asyncio.wait({accept, self._serving}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # start() cancelled
            accept.cancel()
            channel.close()
            raise
        if accept.done() and not accept.cancelled() and accept.exception() is None:
            self._channel = channel
            return
        accept.cancel()
        channel.close()
        if self._serving.done():  # a rank's call ended first: its own error, worded as the other phases'
            await self._settle(self._serving, "serve_steps")
        self._mark_dead(f"'serve_steps': not every rank joined the step channel within {timeout_s:.0f}s")
        raise EngineDeadError(f"TP gang is dead: {self._dead_reason}")

    async def step(self, step: StepInput) -> StepOutput:
        """Send ``step`` to every rank; return rank 0's output (the sampled tokens). Waits as long as the step
        takes while every rank answers liveness pings and makes progress (module docstring)."""
        if self._dead_reason:
            raise EngineDeadError(f"TP gang is dead: {self._dead_reason}")
        if self._channel is not None:
            running = asyncio.ensure_future(asyncio.gather(*await self._channel.send(step)))
        else:
            running = asyncio.ensure_future(asyncio.gather(*[w.step.remote(step) for w in self.workers]))
        timeout = self.config.step_timeout_s
        period = min(self.LIVENESS_PERIOD_S, timeout)
        progress: list[tuple[int, float] | None] = [None] * len(self.workers)  # per rank: (count, when it moved)
        try:
            while not (await asyncio.wait({running}, timeout=period))[0]:
                counts = await self._wait([w.ping.remote() for w in self.workers], timeout,
                                          "liveness ping during a step", all_results=True)
                now = asyncio.get_running_loop().time()
                for rank, count in enumerate(counts):
                    if progress[rank] is None or progress[rank][0] != count:
                        progress[rank] = (count, now)
                    elif now - progress[rank][1] > timeout:
                        self._mark_dead(f"rank {rank} made no progress in a step for {timeout:.0f}s (hung)")
                        raise EngineDeadError(f"TP gang is dead: {self._dead_reason}")
        except BaseException:  # a dead rank found by a ping, or the engine shutting down
            running.cancel()
            running.add_done_callback(retrieve)  # its outcome no longer matters; do not log it as unretrieved
            raise
        return (await self._settle(running, "step"))[0]

    async def pids(self) -> list[int]:
        return await self._wait([w.pid.remote() for w in self.workers], 30, "pid", all_results=True)

    async def probe(self) -> None:
        if self._dead_reason:
            raise EngineDeadError(f"TP gang is dead: {self._dead_reason}")
        await self._wait([w.ping.remote() for w in self.workers], self.config.step_timeout_s, "liveness ping",
                         all_results=True)

    async def memory_stats(self) -> list[dict]:
        """Host memory of every rank (rss_mb, pss_mb, peak_rss_mb), in rank order: for benchmarks (the engine
        does not ask)."""
        return await self._wait([w.memory_stats.remote() for w in self.workers], 30, "memory_stats", all_results=True)

    async def _wait(self, refs: list, timeout_s: float, what: str, all_results: bool = False):
        try:
            results = await self._settle(asyncio.wait_for(asyncio.gather(*refs), timeout_s), what)
        except _Timeout:
            self._mark_dead(f"'{what}' did not finish within {timeout_s:.0f}s on all ranks")
            raise EngineDeadError(f"TP gang is dead: {self._dead_reason}") from None
        return results if all_results else results[0]

    async def _settle(self, awaitable, what: str) -> list:
        """Await every rank's result; any rank's failure marks the gang dead and raises (``ConfigError`` as it
        is). Our own wait running out raises ``_Timeout`` for the caller to word."""
        try:
            return await awaitable
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a dead actor or any worker exception breaks the group
            if isinstance(e, (TimeoutError, asyncio.TimeoutError)) and not isinstance(e, RayError):  # wait_for's
                raise _Timeout() from None
            cause = getattr(e, "cause", None)
            self._mark_dead(f"'{what}' failed: {type(cause or e).__name__}: {cause or e}")
            if isinstance(cause, ConfigError):  # the user's to fix: pass the message on as it is
                raise cause from None
            raise EngineDeadError(f"TP gang is dead: {self._dead_reason}") from e

    def _mark_dead(self, reason: str) -> None:
        if not self._dead_reason:
            logger.error("raytp gang failure: %s", reason)
            self._dead_reason = reason
            # Surviving ranks may be blocked in a collective forever: kill them now, not at replica teardown.
            self.shutdown()

    def shm_segments(self) -> list[str]:
        """DeepSpeed's CPU all-reduce buffers of this gang still named in /dev/shm
        (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``). Empty once the gang has loaded: each
        rank unlinks its own as soon as every rank has mapped it (``Worker.init_distributed``)."""
        if self._rendezvous is None:
            return []
        from raytp.gang.loader import shm_buffer_paths

        return shm_buffer_paths(*self._rendezvous)

    def shutdown(self) -> None:
        """Kill every rank (a broken group cannot barrier) and free a placement group we made."""
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead is fine
                pass
        self.workers = []
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        # A gang that failed between creating its buffers and unlinking them leaves them behind; the replica
        # runs on rank 0's node (bundle 0), where they live.
        for path in self.shm_segments():
            try:
                os.unlink(path)
            except OSError:
                pass
        if self._own_pg is not None:
            remove_placement_group(self._own_pg)
            self._own_pg = None
        if not self._dead_reason:
            self._dead_reason = "shut down"
