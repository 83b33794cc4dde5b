"""How a device captures a step as a graph and replays it: the capture strategy a platform supplies
(``Platform.graph_capture``) to the graph runner (``raytp.gang.graph_runner``), which knows nothing of devices.

``DeviceGraphs`` drives torch's graph API of one device module (``torch.cuda``: ``CUDAGraph``, ``graph``,
``graph_pool_handle``, ``Stream``, ``stream``, ``current_stream``, ``synchronize``). Intel GPUs get theirs by
naming ``torch.xpu`` and its graph class in ``raytp.platforms.xpu`` once it is verified on a device.
"""

from __future__ import annotations

from collections.abc import Callable


class DeviceGraphs:
    """``capture(keys, forward)``: run ``forward(key)`` once per key outside capture (lazy inits, workspaces,
    kernel compilation), then capture each as a graph, largest first, all in one memory pool (smaller graphs reuse
    the larger ones' memory); returns key -> a function that replays that graph and returns its output tensor,
    which is the same tensor at every replay."""

    def __init__(self, name: str, module, graph_class: str):
        self.name = name
        self.module = module
        self.graph_class = graph_class

    def capture(self, keys: list, forward: Callable) -> dict:
        g = self.module
        pool = g.graph_pool_handle()
        stream = g.Stream()
        stream.wait_stream(g.current_stream())
        with g.stream(stream):
            for key in keys:
                forward(key)
        g.current_stream().wait_stream(stream)
        replays = {}
        for key in reversed(keys):
            graph = getattr(g, self.graph_class)()
            with g.graph(graph, pool=pool):
                out = forward(key)
            replays[key] = _replayer(graph, out)
        g.synchronize()
        return replays


def _replayer(graph, out) -> Callable:
    def replay():
        graph.replay()
        return out
    return replay
