"""The step channel: each step to every rank, and every rank's output back, over one Unix socket per rank instead of a
Ray actor call per rank per step.

Why: on this project's 2-core host a step sent to a TP=2 gang as Ray actor calls and awaited costs 1.20 ms of wall
time and 0.84 ms of the driver's CPU even when the ranks have nothing to do; over two Unix sockets 0.11 ms and
0.08 ms (``benchmarks/step_channel.py``). With millisecond steps (a small model, an accelerator) that is
a third of a step, and on a small CPU host the driver's CPU is taken from the ranks. vLLM's executors broadcast steps
through shared memory for the same reason. Ray still creates, places, pings and kills the ranks (a rank's
``serve_steps`` call runs the channel's loop on the thread that loaded the model; pings come on another); only the
steps take this path, and only where every rank runs on the driver's node (a TP group always does;
``RayExecutor`` falls back to actor calls otherwise).

Framing: a 4-byte little-endian length, then a pickle. Driver to rank: a ``StepInput``. Rank to driver: ``(True,
StepOutput)`` or ``(False, exception)``. A rank runs its steps one at a time in the order sent, so each reply
resolves the oldest step waiting on that rank: several steps may be in flight (async scheduling keeps two).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import pickle
import shutil
import socket
import struct
import tempfile

logger = logging.getLogger(__name__)
_LEN = struct.Struct("<I")


class RankFailed(Exception):
    """A rank raised in a step; ``cause`` is its exception (as a Ray task error carries it)."""

    def __init__(self, rank: int, cause: BaseException):
        super().__init__(f"rank {rank}: {type(cause).__name__}: {cause}")
        self.cause = cause


class RankGone(Exception):
    """A rank's end of the channel closed: its process exited or was killed."""


def _frame(obj) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(data)) + data


def retrieve(future: asyncio.Future) -> None:
    """A done callback taking a future's outcome, so that one nobody awaits is not reported as never retrieved."""
    if not future.cancelled():
        future.exception()


class StepChannel:
    """The driver's end. ``listen`` (any thread), ``accept`` (any event loop) the ranks' connections, then
    ``send`` steps from one event loop (the engine core's; the channel binds to the first loop that sends)."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._dir = tempfile.mkdtemp(prefix="raytp-steps-")
        self.path = os.path.join(self._dir, "s")  # short: a Unix socket path must fit in 108 bytes
        self._listener: socket.socket | None = None
        self._socks: dict[int, socket.socket] = {}
        self._writers: list[asyncio.StreamWriter] | None = None
        self._pending: list[collections.deque] = [collections.deque() for _ in range(world_size)]
        self._bind_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readers: list[asyncio.Task] = []  # (held: the loop keeps only weak references to tasks)
        self._gone: str | None = None
        self.steps = 0

    def listen(self) -> str:
        """Open the socket the ranks connect to; returns its path."""
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(self.world_size)
        self._listener.setblocking(False)
        return self.path

    async def accept(self) -> None:
        """Take every rank's connection (each announces its rank first). The caller bounds the wait."""
        loop = asyncio.get_running_loop()
        while len(self._socks) < self.world_size:
            sock, _ = await loop.sock_accept(self._listener)
            header = b""
            while len(header) < _LEN.size:
                chunk = await loop.sock_recv(sock, _LEN.size - len(header))
                if not chunk:
                    raise RankGone("a rank closed the step channel before naming itself")
                header += chunk
            self._socks[_LEN.unpack(header)[0]] = sock
        # every rank is connected: nothing more to accept, and no socket file left behind however the process ends
        self._listener.close()
        self._listener = None
        shutil.rmtree(self._dir, ignore_errors=True)

    async def send(self, step) -> list[asyncio.Future]:
        """Send ``step`` to every rank; returns one future per rank (in rank order) for its output. A rank's
        failure fails its future with ``RankFailed``; a closed channel with ``RankGone``."""
        if self._writers is None:
            async with self._bind_lock:
                if self._writers is None:
                    await self._bind()
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # streams and futures belong to the loop that bound them
            raise RuntimeError("the step channel is bound to another event loop than this step's")
        futures = []
        for rank in range(self.world_size):
            future = loop.create_future()
            future.add_done_callback(retrieve)  # the caller may stop at the first failure
            futures.append(future)
            if self._gone:
                future.set_exception(RankGone(self._gone))
            else:
                self._pending[rank].append(future)
        if not self._gone:
            message = _frame(step)  # pickled once for every rank
            for writer in self._writers:
                writer.write(message)
        self.steps += 1
        return futures

    async def _bind(self) -> None:
        """Streams over the accepted sockets in the sending loop, and a reader per rank."""
        self._loop = asyncio.get_running_loop()
        writers = []
        for rank in range(self.world_size):
            reader, writer = await asyncio.open_unix_connection(sock=self._socks[rank])
            writers.append(writer)
            self._readers.append(self._loop.create_task(self._read(rank, reader)))
        self._writers = writers

    async def _read(self, rank: int, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                size = _LEN.unpack(await reader.readexactly(_LEN.size))[0]
                ok, value = pickle.loads(await reader.readexactly(size))
                if not self._pending[rank]:  # failed already: another rank went away (the gang is dead)
                    continue
                future = self._pending[rank].popleft()
                if future.done():  # its step was cancelled
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(RankFailed(rank, value))
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            self._fail(f"rank {rank} closed its step channel (its process exited or was killed: {type(e).__name__})")
        except asyncio.CancelledError:
            self._fail("the step channel was closed")
            raise

    def _fail(self, reason: str) -> None:
        self._gone = self._gone or reason
        for pending in self._pending:
            while pending:
                future = pending.popleft()
                if not future.done():
                    future.set_exception(RankGone(self._gone))

    def close(self) -> None:
        """Close the driver's end (any thread; idempotent). Steps still waiting fail with ``RankGone``."""
        self._gone = self._gone or "the step channel was closed"
        loop, writers = self._loop, self._writers or []

        def close_streams():
            for writer in writers:
                writer.close()
            self._fail(self._gone)

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None:  # never wrapped in streams
            for sock in self._socks.values():
                sock.close()
        elif running is loop:
            close_streams()
        elif not loop.is_closed():
            try:
                loop.call_soon_threadsafe(close_streams)  # streams and futures belong to their loop's thread
            except RuntimeError:  # it closed meanwhile
                pass
        if self._listener is not None:
            self._listener.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def serve_rank(path: str, rank: int, step) -> None:
    """The rank's end: connect to the driver's channel at ``path`` and run every step it sends through ``step``
    (``Worker.step``), replying in order, until the driver closes the channel — in the calling thread, which should
    be the one that loaded and warmed the model: OpenMP keeps a team of worker threads per thread that starts
    parallel work, and a second team on a fully used CPU makes libgomp stop spinning between parallel regions
    (measured: a 2-thread rank's steps ran ~30 % slower from a thread of their own)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(_LEN.pack(rank))
    stream = sock.makefile("rb")  # (holds the socket open: closed with it below)
    try:
        while True:
            header = stream.read(_LEN.size)
            if len(header) < _LEN.size:
                return  # the driver closed the channel
            message = pickle.loads(stream.read(_LEN.unpack(header)[0]))
            try:
                reply = (True, step(message))
            except Exception as e:  # noqa: BLE001 - any failure is the driver's to report
                reply = (False, e)
            try:
                data = _frame(reply)
            except Exception:  # noqa: BLE001 - an exception that does not pickle: its text does
                data = _frame((False, RuntimeError(f"{type(reply[1]).__name__}: {reply[1]}")))
            sock.sendall(data)
    except OSError as e:
        logger.warning("rank %d: step channel closed: %s", rank, e)
    finally:
        stream.close()
        sock.close()
