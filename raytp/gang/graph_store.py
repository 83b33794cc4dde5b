"""Compiled model-step graphs kept whole on disk, so a restart neither traces nor compiles them.

``torch.compile`` caches only its later stages (AOTAutograd's and Inductor's output): each start still runs Dynamo
over the model, tens of seconds per graph for a 24-layer model on one core (the 0.5B's two decode graphs: ~20 s of
a restart after the caches, ~90 s of the first start's ~240 s). torch's ``aot_compile`` (what vLLM's
``VLLM_USE_AOT_COMPILE`` uses) captures a function whole — Dynamo's bytecode and the compiled graph, bundled — and
serialises it; loading takes well under a second.

What such a file does not carry is what Dynamo's guards would check, since they are dropped (as vLLM does: the
model runner picks the graph for a step itself, ``raytp.gang.compiled``): a file serves only the process that
states the same ``facts`` (model shapes, dtype, TP rank, KV layout, thread count, CPU, versions: the caller's
list, hashed into the directory name), and only while the source Dynamo traced is unchanged (checked at load
against the modules it inlined, as vLLM checks). Anything else — a torch without ``aot_compile``, a file from
another build, a failure to save — falls back to compiling, with a log line; it never stops a start.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import json
import logging
import os
import pickle
import tempfile
import types

import torch

logger = logging.getLogger(__name__)
FORMAT = 1  # of the files below: bump when what they hold changes


def available() -> bool:
    """This torch can capture and serialise a compiled function (``aot_compile``, torch >= 2.10)."""
    return hasattr(torch._dynamo.config, "enable_aot_compile") and hasattr(torch.compiler, "load_compiled_function")


class GraphStore:
    """Compiled functions for one set of ``facts`` under ``root`` (the rank's Inductor cache directory)."""

    def __init__(self, root: str, facts: dict):
        text = json.dumps({"format": FORMAT, **facts}, sort_keys=True, default=str)
        self.dir = os.path.join(root, "raytp-graphs", hashlib.sha256(text.encode()).hexdigest()[:32])

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name + ".graph")

    def load(self, name: str, f_globals: dict):
        """The function saved as ``name``, ready to call, or None (none saved, unreadable, or the source it traced
        has changed since). ``f_globals``: the globals of the function that was compiled."""
        path = self._path(name)
        if not os.path.exists(path):
            return None
        try:
            with open(path, "rb") as f:
                modules, data = pickle.load(f)
            # Dynamo names some modules in its bytecode by object id: restored here by module name
            f_globals = {**f_globals, **{ref: importlib.import_module(m) for ref, m in modules.items()}}
            fn = torch.compiler.load_compiled_function(io.BytesIO(data), f_globals=f_globals)
            changed = sorted(s.module for s in fn.source_info().inlined_sources if _source(s.module) != s.content)
        except Exception as e:  # noqa: BLE001 - unpickling and torch's loader raise many types
            logger.warning("compiled graph %s could not be loaded (%s: %s): compiling it again", path,
                           type(e).__name__, str(e)[:300])
            return None
        if changed:
            logger.info("compiled graph %s: the source of %s changed since it was saved: compiling it again", path,
                        ", ".join(changed[:5]))
            return None
        return fn

    def save(self, name: str, fn, f_globals: dict) -> bool:
        """Write ``fn`` (an ``aot_compile`` result) as ``name``, atomically; False (logged) if it cannot be."""
        try:
            refs = fn._artifacts.runtime_env.external_refs
            modules = {r: f_globals[r].__name__ for r in refs if isinstance(f_globals.get(r), types.ModuleType)}
            data = pickle.dumps((modules, type(fn).serialize(fn).serialized_data))
            os.makedirs(self.dir, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.dir, delete=False) as tmp:
                tmp.write(data)
            os.replace(tmp.name, self._path(name))
            return True
        except Exception as e:  # noqa: BLE001 - serialising a graph raises many types
            logger.warning("compiled graph %s not saved (%s: %s): the next start compiles it again", name,
                           type(e).__name__, str(e)[:300])
            return False


def _source(module: str) -> str | None:
    try:
        return inspect.getsource(importlib.import_module(module))
    except (ImportError, OSError, TypeError):
        return None
