"""``ingress: in_server``: the model server in the ingress's own replica, called the way its handle would be.

With a separate ingress each streamed chunk crosses two Ray hops (server replica -> ingress replica -> HTTP proxy)
and three processes handle every token. Here the ingress's routes call an ``LLMServer`` built in the same process
(``InServer.start``) through ``LocalServerHandle``, which answers ``handle.<method>.remote(...)`` and
``handle.options(stream=True).<method>.remote(...)`` as a ``DeploymentHandle`` does: an awaitable, or an async
iterator with ``cancel()``. So the ingress's code (auth, SSE framing, errors, the Python handle API) is one code
path for both layouts. Errors are the server's own typed exceptions, unwrapped.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(frozen=True)
class InServer:
    """What the combined deployment is bound with instead of a server handle: the server's arguments."""

    cfg: object  # RaytpConfig, without the API key
    device: str
    engine_factory: object = None

    async def start(self) -> "LocalServerHandle":
        """Build the ``LLMServer`` (resolve the config on this node, start its gang) in this process."""
        from raytp.serve.server import LLMServer

        return LocalServerHandle(await LLMServer.create(self.cfg, self.device, self.engine_factory))


class LocalServerHandle:
    """A ``DeploymentHandle``-shaped view of an ``LLMServer`` object in this process."""

    def __init__(self, server, stream: bool = False):
        self.server = server
        self._stream = stream

    def options(self, stream: bool = False) -> "LocalServerHandle":
        return LocalServerHandle(self.server, stream)

    def __getattr__(self, name: str) -> "_Method":
        return _Method(getattr(self.server, name), self._stream)


class _Method:
    def __init__(self, method, stream: bool):
        self.method, self.stream = method, stream

    def remote(self, *args, **kwargs):
        if self.stream:
            return _LocalStream(self.method(*args, **kwargs))
        return self.method(*args, **kwargs)  # a coroutine: awaited by the caller, as a DeploymentResponse is


class _LocalStream:
    """An async generator with a ``DeploymentResponseGenerator``'s ``cancel()``: closing it ends the server's
    generator, which aborts the request in the engine (a client that went away)."""

    def __init__(self, agen):
        self._agen = agen

    def __aiter__(self):
        return self

    def __anext__(self):
        return self._agen.__anext__()

    def cancel(self) -> None:
        # Sync, as Ray's is; the generator is not running here (its consumer is in a finally), so closing it
        # runs its finally blocks at once on the next turn of the loop.
        asyncio.get_running_loop().create_task(self._agen.aclose())
