"""Steps on fixed shapes, captured once and replayed: the one graph runner of a rank.

Two strategies meet here, each chosen once at start-up by the layer that knows: the *bucket policy* comes from
the attention backend (``AttentionBackend.shapes``: which steps can be padded to which fixed shapes, over which
persistent buffers — ``raytp.gang.attention.shapes``), the *capture strategy* from the platform
(``Platform.graph_capture``: how this device records and replays a graph — ``raytp.platforms.graphs``). A step
the policy accepts is loaded into the buffers and its bucket's graph replayed; any other step runs eagerly in the
model runner. A new device's graphs are one capture strategy in its platform file; a new kernel's shapes, one
policy in its backend.
"""

from __future__ import annotations

import logging
import time

import torch

from raytp.gang.attention import AttentionBackend
from raytp.gang.attention.shapes import StepShapes

logger = logging.getLogger(__name__)


class GraphRunner:
    """Runs the steps ``shapes`` accepts as replays of graphs that ``capture`` recorded at start-up (``warm_up``).
    ``replays`` counts replayed steps (what device tests and the report read: graphs that are captured but never
    replayed are a bug the count shows)."""

    def __init__(self, model, backend: AttentionBackend, shapes: StepShapes, capture):
        self.model = model
        self.backend = backend
        self.shapes = shapes
        self.capture = capture
        self.mode = capture.name
        self._graphs: dict = {}
        self.replays = 0
        self.warm_up_s = 0.0

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Capture every bucket now, so no request pays for it; returns the seconds. The buffers hold a valid
        dummy step (the policy's initial state)."""
        start = time.perf_counter()
        self._graphs = self.capture.capture(self.shapes.keys(), self._forward)
        self.warm_up_s = time.perf_counter() - start
        logger.info("%s: %d %s buckets ready in %.1f s", type(self.shapes).__name__, len(self._graphs), self.mode,
                    self.warm_up_s)
        return self.warm_up_s

    def accepts(self, rows):
        """The bucket of a step's rows, or None: run it eagerly."""
        return self.shapes.accepts(rows)

    @torch.inference_mode()
    def run(self, rows, bucket, tables: torch.Tensor) -> torch.Tensor:
        """Logits [len(rows), V] at each row's last token (writing every row's new KV into its blocks).
        ``tables``: the rank's device block tables, row ``r.slot`` for each row."""
        self.shapes.load(rows, bucket, tables)
        self.replays += 1
        return self._graphs[bucket]()[:len(rows)]

    def _forward(self, key) -> torch.Tensor:
        out = self.model(**self.shapes.model_inputs(key), use_cache=False, raytp_backend=self.backend)
        return out.logits[0]
