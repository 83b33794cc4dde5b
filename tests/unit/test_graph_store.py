"""The graph store (``raytp.gang.graph_store``) gives back a captured function only to the process that states the
same facts and only while the source Dynamo traced is unchanged; anything it cannot use is a miss, never an
error."""

import importlib
import logging
import os
import sys

import pytest
import torch

from raytp.gang import graph_store

pytestmark = pytest.mark.skipif(not graph_store.available(), reason="this torch has no aot_compile")


def capture(fn, x):
    compiled = torch.compile(fn, backend="inductor", fullgraph=True, dynamic=True,
                             options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe})
    with torch._dynamo.config.patch(enable_aot_compile=True):
        return compiled.aot_compile(((x,), {}))


def test_a_saved_graph_loads_for_the_same_facts_until_its_traced_source_changes(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="raytp.gang.graph_store")
    source = tmp_path / "raytp_store_probe.py"
    source.write_text("def step(x):\n    return (x * 2 + 1).relu()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("raytp_store_probe")
    x = torch.randn(5, 3)
    store = graph_store.GraphStore(str(tmp_path / "cache"), {"model": "probe", "tp": (0, 1)})
    assert store.load("g", module.__dict__) is None  # nothing saved yet
    assert store.save("g", capture(module.step, x), module.__dict__)

    loaded = store.load("g", module.__dict__)
    assert loaded is not None
    y = torch.randn(9, 3)  # another size: the graph is dynamic
    torch.testing.assert_close(loaded(y), (y * 2 + 1).relu())
    other = graph_store.GraphStore(str(tmp_path / "cache"), {"model": "probe", "tp": (1, 2)})
    assert other.dir != store.dir and other.load("g", module.__dict__) is None

    source.write_text("def step(x):\n    return (x * 3 + 1).relu()\n")  # the traced source changes
    sys.modules.pop("raytp_store_probe")
    importlib.invalidate_caches()
    module = importlib.import_module("raytp_store_probe")
    assert store.load("g", module.__dict__) is None
    assert "the source of raytp_store_probe changed" in caplog.text


def test_an_unreadable_file_is_a_miss_with_a_warning(tmp_path, caplog):
    store = graph_store.GraphStore(str(tmp_path), {"model": "probe"})
    os.makedirs(store.dir)
    with open(os.path.join(store.dir, "g.graph"), "wb") as f:
        f.write(b"truncated")
    assert store.load("g", {}) is None
    assert "could not be loaded" in caplog.text
