"""The capture strategy's contract, on a stand-in for torch's graph API (no GPU here): every bucket runs once
outside capture, then is captured largest first into one shared pool, and each replay replays that bucket's
graph and returns the tensor its capture produced."""

import contextlib

from raytp.platforms.graphs import DeviceGraphs


class FakeGraphAPI:
    """Records what ``DeviceGraphs`` does with torch.cuda's names."""

    def __init__(self):
        self.events = []
        self.capturing = None

    def graph_pool_handle(self):
        return "pool"

    def Stream(self):  # noqa: N802 - torch.cuda's name
        return self

    def wait_stream(self, _other):
        pass

    def current_stream(self):
        return self

    @contextlib.contextmanager
    def stream(self, _stream):
        yield

    def CUDAGraph(self):  # noqa: N802
        api = self

        class Graph:
            def replay(self):
                api.events.append(("replay", self.key))
        return Graph()

    @contextlib.contextmanager
    def graph(self, graph, pool):
        assert pool == "pool"
        self.capturing = graph
        yield
        self.capturing = None

    def synchronize(self):
        self.events.append(("sync",))


def test_device_graphs_warm_each_bucket_then_capture_largest_first_and_replay_their_outputs():
    api = FakeGraphAPI()

    def forward(key):
        if api.capturing is not None:
            api.capturing.key = key
        api.events.append(("capture" if api.capturing is not None else "warm", key))
        return f"out{key}"

    replays = DeviceGraphs("cuda_graphs", api, "CUDAGraph").capture([1, 2, 4], forward)
    assert api.events == [("warm", 1), ("warm", 2), ("warm", 4), ("capture", 4), ("capture", 2), ("capture", 1),
                          ("sync",)]
    api.events.clear()
    assert replays[2]() == "out2" and replays[4]() == "out4"
    assert api.events == [("replay", 2), ("replay", 4)]  # replaying runs no forward
