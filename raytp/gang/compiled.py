"""The model step compiled once: ``torch.compile`` (Inductor) of the Hugging Face model's decoder, in one of two
modes, chosen by what the attention backend offers.

*Decode steps, attention inline* (``graph_decode``: the CPU's sdpa backend with its decode kernel). Steps whose
rows each compute one token — every step of a stream after its prompt — run one graph: embeddings, RMSNorm, RoPE,
the projections (the prepacked oneDNN linears, graph constants under ``freezing``), the MLP, with TP > 1
DeepSpeed's ``torch.ops.deepspeed.inference_all_reduce_``, and each layer's KV write and paged attention
(``AttentionBackend.graph_decode``), traced as tensor code: no opaque call per layer, no per-op Python. Its sizes —
rows and table width — are dynamic: one graph for every decode step of two rows or more, and one for single-row
steps (size 1 is specialised; padding such a step to two rows would cost ~8 % of it in oneDNN's products, which
are cheapest at M = 1). Steps with prompt chunks run eagerly: a chunk's products are compute-bound, where the
graph gains little (the whole-step graph below measured 0.80x on a 128-token chunk).

*Every step, attention opaque* (other backends). The token dimension is dynamic, traced *size-obliviously*
(vLLM's choice too) with a hint, which Inductor's weight prepacking needs: a 2-token step and a 512-token chunk
run one graph; Inductor's cache guards the hint against 1, so single-token steps get a second graph. Attention,
with its KV write, is one opaque operator per layer (``raytp.gang.attention.op``) that reads the step's backend and
metadata from a context, so block tables, plans and row counts never reach the compiler.

Either way the LM head runs after the graph, eagerly, on the kept positions only: one matmul, and DeepSpeed's
sharded head (a batched matmul over a data-dependent row count) does not lower in Inductor. Graphs are compiled at
start-up (``warm_up``); ``compiles`` counts them, and every compile after ``warm_up`` is a recompile in steady
state, which tests forbid. Compiled artefacts go to Inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``, set per
rank by the platform), so a restart reuses them; on CPU, whose graphs hold oneDNN's packed weights, which that cache
refuses by itself, through ``raytp.gang.packed_cache``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
import types

import torch

from raytp.gang.attention import AttentionBackend, AttentionMetadata
from raytp.gang.attention.op import step_context

logger = logging.getLogger(__name__)
_instances = itertools.count()


def _call(decoder, **kwargs):
    """The compiled frame: the decoder's forward, inlined into it (each ``CompiledModel`` compiles a copy)."""
    return decoder(**kwargs)


class CompiledModel:
    """``model``'s decoder compiled with Inductor ``options`` (its config names, e.g. ``freezing``); calls give
    the logits of the kept positions, as the eager forward does. ``decode_only``: the first mode of the module
    docstring (``decode``), else the second (``__call__``)."""

    def __init__(self, model, options: dict, decode_only: bool = False):
        from raytp.gang import packed_cache

        packed_cache.install()  # CPU graphs hold packed weights: cached across restarts only with it
        self.options = dict(options)
        self.decode_only = decode_only
        self.steps = 0  # steps run through the graph (warm-up included)
        self.compiles = 0
        self.warm_up_compiles = 0  # graphs compiled by ``warm_up``: any more are recompiles
        self.warm_up_s = 0.0
        # Dynamo keeps compiled graphs per code object and stops compiling one after 8 (its recompile limit), falling
        # back to eager without a word: a frame of this instance's own (as ``PagedDecode``'s) keeps every model in
        # a process — tests build many — from sharing the limit of ``LlamaModel.forward``.
        code = _call.__code__.replace(co_name=f"raytp_model_step_{next(_instances)}")
        # No guards on the modules' attributes and weights: a rank never changes its model after loading, and those
        # guards cost ~1 ms per step on a 28-layer model (checked on every call); the inputs' guards stay.
        self._step = torch.compile(types.FunctionType(code, _call.__globals__, code.co_name), backend=self._compile,
                                   dynamic=True,
                                   options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        self._decoder = model.get_decoder()
        self._head = model.get_output_embeddings()

    def _tracing(self):
        """The settings Dynamo traces under (on a first call or a recompile; a cheap no-op otherwise):
        size-oblivious dynamic sizes that keep a hint, which Inductor's weight prepacking needs (an unbacked size
        fails it); and the Inductor options, whose ``freezing`` Dynamo reads too: only then are the weights graph
        constants that Inductor can reorder once for oneDNN."""
        import torch._inductor.config as inductor_config
        import torch.fx.experimental._config as fx_config

        stack = contextlib.ExitStack()
        stack.enter_context(fx_config.patch(backed_size_oblivious=True))
        # floats (the attention scale) are constants: symbolic, they restart the trace half-way (~1/3 of the time)
        stack.enter_context(torch._dynamo.config.patch(specialize_float=True))
        stack.enter_context(inductor_config.patch(self.options))
        return stack

    def _compile(self, graph_module, example_inputs):
        import torch._inductor.config as inductor_config
        from torch._inductor.compile_fx import compile_fx

        self.compiles += 1
        if self.warm_up_s:  # after start-up every compile is a recompile: a shape or guard the warm-up missed
            logger.warning("model step recompiled (%d since start-up): steps stall while it compiles",
                           self.compiles - self.warm_up_compiles)
        with inductor_config.patch(self.options):
            return compile_fx(graph_module, example_inputs)

    def __call__(self, backend: AttentionBackend, meta: AttentionMetadata, ids: torch.Tensor,
                 keep: torch.Tensor) -> torch.Tensor:
        """Logits [len(keep), V] of a step: ``ids`` [1, T], ``keep`` [K] token indices whose logits are wanted."""
        torch._dynamo.decorators.mark_dynamic(ids, 1)
        torch._dynamo.decorators.mark_dynamic(meta.positions, 1)
        self.steps += 1
        with step_context(backend, meta), self._tracing():
            hidden = self._step(self._decoder, input_ids=ids, position_ids=meta.positions, use_cache=False,
                                raytp_op=True)
        # [1, K, H] in: DeepSpeed's sharded head slices a 3-D input
        return self._head(hidden.last_hidden_state[:, keep])[0]

    def decode(self, backend: AttentionBackend, meta: AttentionMetadata, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of a decode-only step: ``ids`` [1, B], one token per row of ``meta``, written into the
        pool at ``meta.slot_mapping`` and attended by ``backend.graph_decode`` inside the graph."""
        positions, slots, tables, lens = meta.positions, meta.slot_mapping, meta.block_tables, meta.seq_lens
        if tables.shape[1] == 1:  # widths 0 and 1 are specialised: pad (the kernel masks past a row's length)
            tables = torch.nn.functional.pad(tables, (0, 1))
        for t in (ids, positions):
            torch._dynamo.decorators.mark_dynamic(t, 1)
        for t in (slots, tables, lens):
            torch._dynamo.decorators.mark_dynamic(t, 0)
        torch._dynamo.decorators.mark_dynamic(tables, 1)
        pool = backend.pool
        self.steps += 1
        with self._tracing():
            hidden = self._step(self._decoder, input_ids=ids, position_ids=positions, use_cache=False,
                                raytp_graph=(backend.graph_decode, (slots, tables, lens, pool.keys, pool.values)))
        return self._head(hidden.last_hidden_state)[0]

    def warm_up(self, backend: AttentionBackend, device: str) -> float:
        """Compile now (start-up), on dummy steps in the null block (whose contents every read masks; zeroed
        after), so no request pays for it; returns the seconds."""
        from raytp.gang.attention import build

        start = time.perf_counter()
        if self.decode_only:
            # 16 rows, then one (a second graph: size 1 is specialised, and padding it to two rows would cost ~8 %
            # of a batch-1 step in oneDNN's products), at 256 tokens of context: Inductor's loop choices follow the
            # first sizes it sees
            bs = backend.pool.block_size
            for rows in (16, 1):
                layout = [(1, 16 * bs - 1, (0,) * 16)] * rows
                with torch.inference_mode():
                    self.decode(backend, build(layout, bs, device),
                                torch.zeros((1, rows), dtype=torch.long, device=device))
            backend.pool.zero_null_block()
            return self._warmed(start)
        # a 2-token step, then a 1-token one: Inductor's cache guards the token count's hint against 1 (a second
        # graph for single-token steps), so both are compiled here and steady state never compiles
        for tokens in (2, 1):
            layout = [(tokens, 0, (0,))]
            with torch.inference_mode():  # as steps run: inference tensors (their dispatch keys are guarded)
                meta = build(layout, backend.pool.block_size, device)
                backend.prepare(meta, layout)
                self(backend, meta, torch.zeros((1, tokens), dtype=torch.long, device=device),
                     torch.arange(tokens, device=device))
        return self._warmed(start)

    def _warmed(self, start: float) -> float:
        self.warm_up_s = time.perf_counter() - start
        self.warm_up_compiles = self.compiles
        logger.info("model step compiled in %.1f s (%d graphs, inductor options %s)", self.warm_up_s, self.compiles,
                    self.options)
        return self.warm_up_s
