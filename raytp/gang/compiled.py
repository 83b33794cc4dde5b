"""The model step compiled once: ``torch.compile`` (Inductor) of the Hugging Face model's decoder, in one of two
modes, chosen by what the attention backend offers.

*Decode steps, attention inline* (``graph_decode``: the CPU's sdpa backend with its decode kernel). Steps whose
rows each compute one token — every step of a stream after its prompt — run one graph: embeddings, RMSNorm, RoPE,
the projections (the prepacked oneDNN linears, called by index: ``raytp.gang.linears.packed_linear``), the MLP,
with TP > 1 DeepSpeed's ``torch.ops.deepspeed.inference_all_reduce_``, and each layer's KV write and paged attention
(``AttentionBackend.graph_decode``): traced as tensor code, or for bf16 on AVX-512 CPUs raytp's decode kernel as
one opaque op per layer (``raytp::cpu_paged_decode``); no per-op Python either way. Its sizes —
rows and table width — are dynamic: one graph for every decode step of two rows or more, and one for single-row
steps (size 1 is specialised; padding such a step to two rows would cost ~8 % of it in oneDNN's products, which
are cheapest at M = 1). Steps with prompt chunks run eagerly: a chunk's products are compute-bound, where the
graph gains little (the whole-step graph below measured 0.80x on a 128-token chunk). Both graphs are captured whole
at start-up (``aot_compile``) and saved (``raytp.gang.graph_store``): a restart loads them in well under a second
instead of tracing the model again. They hold no weight (the linears are reached by index), so a graph serves any
model of these shapes.

*Every step, attention opaque* (other backends). The token dimension is dynamic, traced *size-obliviously*
(vLLM's choice too) with a hint, which Inductor's weight prepacking needs: a 2-token step and a 512-token chunk
run one graph; Inductor's cache guards the hint against 1, so single-token steps get a second graph. Attention,
with its KV write, is one opaque operator per layer (``raytp.gang.attention.op``) that reads the step's backend and
metadata from a context, so block tables, plans and row counts never reach the compiler.

Either way the LM head runs after the graph, eagerly, on the kept positions only: one matmul, and DeepSpeed's
sharded head (a batched matmul over a data-dependent row count) does not lower in Inductor. Graphs are compiled at
start-up (``warm_up``); ``compiles`` counts them, and every compile after ``warm_up`` is a recompile in steady
state, which tests forbid. Compiled artefacts go to AOTAutograd's and Inductor's on-disk caches and the graph
store, all under ``TORCHINDUCTOR_CACHE_DIR`` (set per rank by the platform).
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
from raytp.gang.linears import graph_weights, packed_weights

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
        self.options = dict(options)
        self.decode_only = decode_only
        self.steps = 0  # steps run through the graph (warm-up included)
        self.compiles = 0
        self.warm_up_compiles = 0  # graphs compiled by ``warm_up``: any more are recompiles
        self.loaded = 0  # graphs ``warm_up`` took whole from the graph store (no tracing, no compiling)
        self.warm_up_s = 0.0
        # decode_only: the captured graphs (``raytp.gang.graph_store``) by "one row?"; without them (a torch
        # without aot_compile, a capture that failed) ``_step`` traces and compiles on first use, as below
        self._graphs: dict[bool, object] = {}
        # Dynamo keeps compiled graphs per code object and stops compiling one after 8 (its recompile limit), falling
        # back to eager without a word: a frame of this instance's own (as ``PagedDecode``'s) keeps every model in
        # a process — tests build many — from sharing the limit of ``LlamaModel.forward``.
        code = _call.__code__.replace(co_name=f"raytp_model_step_{next(_instances)}")
        # No guards on the modules' attributes and weights: a rank never changes its model after loading, and those
        # guards cost ~1 ms per step on a 28-layer model (checked on every call); the inputs' guards stay.
        self._fn = types.FunctionType(code, _call.__globals__, code.co_name)
        self._step = torch.compile(self._fn, backend=self._compile, dynamic=True,
                                   options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        self._decoder = model.get_decoder()
        self._head = model.get_output_embeddings()
        self._weights = packed_weights(model)  # CPU: what the graph's packed linears multiply by (by index)
        self._config = model.config

    def _tracing(self):
        """The settings Dynamo traces under (on a first call or a recompile; a cheap no-op otherwise):
        size-oblivious dynamic sizes that keep a hint, which Inductor's weight prepacking needs (an unbacked size
        fails it); and the Inductor options, some of which Dynamo reads too (``freezing``: the weights become graph
        constants; CPU's options no longer set it, ``raytp.gang.linears.packed_linear``)."""
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
        with step_context(backend, meta), graph_weights(self._weights), self._tracing():
            hidden = self._step(self._decoder, input_ids=ids, position_ids=meta.positions, use_cache=False,
                                raytp_op=True)
        # [1, K, H] in: DeepSpeed's sharded head slices a 3-D input
        return self._head(hidden.last_hidden_state[:, keep])[0]

    def decode(self, backend: AttentionBackend, meta: AttentionMetadata, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of a decode-only step: ``ids`` [1, B], one token per row of ``meta``, written into the
        pool at ``meta.slot_mapping`` and attended by ``backend.graph_decode`` inside the graph."""
        kwargs = self._decode_inputs(backend, meta, ids)
        self.steps += 1
        graph = self._graphs.get(ids.shape[1] == 1)
        with graph_weights(self._weights):
            if graph is not None:
                hidden = graph(self._decoder, **kwargs)
            else:
                with self._tracing():
                    hidden = self._step(self._decoder, **kwargs)
        return self._head(hidden.last_hidden_state)[0]

    @staticmethod
    def _decode_inputs(backend: AttentionBackend, meta: AttentionMetadata, ids: torch.Tensor) -> dict:
        """The decoder's keyword arguments for a decode-only step, their step-dependent sizes marked dynamic."""
        positions, slots, tables, lens = meta.positions, meta.slot_mapping, meta.block_tables, meta.seq_lens
        if tables.shape[1] == 1:  # widths 0 and 1 are specialised: pad (the kernel masks past a row's length)
            tables = torch.nn.functional.pad(tables, (0, 1))
        for t in (ids, positions):
            torch._dynamo.decorators.mark_dynamic(t, 1)
        for t in (slots, tables, lens):
            torch._dynamo.decorators.mark_dynamic(t, 0)
        torch._dynamo.decorators.mark_dynamic(tables, 1)
        pool = backend.pool
        return dict(input_ids=ids, position_ids=positions, use_cache=False,
                    raytp_graph=(backend.graph_decode, (slots, tables, lens, pool.keys, pool.values)))

    def _decode_graph(self, store, name: str, kwargs: dict):
        """The decode graph for inputs like ``kwargs``: loaded from ``store``, else captured whole
        (``aot_compile``) and saved there; None where this torch cannot capture (``decode`` then compiles on first
        use)."""
        if store is None:
            return None
        graph = store.load(name, self._fn.__globals__)
        if graph is not None:
            self.loaded += 1
            return graph
        # No guards at all (vLLM's choice for its captured graphs): ``decode`` picks the graph by the step's row
        # count itself, and the store's facts stand for the rest
        compiled = torch.compile(self._fn, backend="inductor", fullgraph=True, dynamic=True,
                                 options={**self.options, "guard_filter_fn": torch.compiler.skip_all_guards_unsafe})
        try:
            with self._tracing(), torch._dynamo.config.patch(enable_aot_compile=True), graph_weights(self._weights):
                graph = compiled.aot_compile(((self._decoder,), kwargs))
        except Exception as e:  # noqa: BLE001 - Dynamo and Inductor raise many types
            logger.info("decode graph not captured whole (%s: %s): compiled on first use instead", type(e).__name__,
                        str(e)[:300])
            return None
        self.compiles += 1
        store.save(name, graph, self._fn.__globals__)
        return graph

    def _store(self, backend: AttentionBackend, device: str):
        """Where this model's captured graphs live (``raytp.gang.graph_store``), with every fact they depend on
        beyond the source Dynamo traced; None where this torch cannot capture a graph whole."""
        import transformers
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        from raytp.gang import graph_store
        from raytp.gang.linears import PackedLinear

        if not graph_store.available():
            return None
        dist = torch.distributed
        pool = backend.pool
        facts = {
            "versions": (torch.__version__, transformers.__version__),
            "model": (self._config.to_json_string(use_diff=False), repr(self._decoder),
                      str(next(self._decoder.parameters()).dtype),
                      sorted({m.min_rows for m in self._decoder.modules() if isinstance(m, PackedLinear)})),
            "tp": (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1),
            "attention": (type(backend).__qualname__, pool.block_size,
                          [(tuple(t.shape[1:]), str(t.dtype)) for t in (*pool.keys, *pool.values)],
                          # e.g. whether raytp's CPU decode kernel or Inductor's loops attend in the graph
                          sorted(getattr(getattr(backend, "graph_decode", None), "keywords", {}).items())),
            "inductor": self.options,
            "host": (device, torch.get_num_threads(), torch.backends.cpu.get_cpu_capability()),
        }
        return graph_store.GraphStore(cache_dir(), facts)

    def warm_up(self, backend: AttentionBackend, device: str) -> float:
        """Compile now (start-up), on dummy steps in the null block (whose contents every read masks; zeroed
        after), so no request pays for it; returns the seconds."""
        from raytp.gang.attention import build

        start = time.perf_counter()
        if self.decode_only:
            # 16 rows, then one (a second graph: size 1 is specialised, and padding it to two rows would cost ~8 %
            # of a batch-1 step in oneDNN's products), at 256 tokens of context: Inductor's loop choices follow the
            # first sizes it sees. Each graph is loaded whole from the store, else captured and saved there.
            bs = backend.pool.block_size
            store = self._store(backend, device)
            for rows in (16, 1):
                layout = [(1, 16 * bs - 1, (0,) * 16)] * rows
                with torch.inference_mode():
                    meta = build(layout, bs, device)
                    ids = torch.zeros((1, rows), dtype=torch.long, device=device)
                    graph = self._decode_graph(store, f"decode_rows{min(rows, 2)}",
                                               self._decode_inputs(backend, meta, ids))
                    if graph is not None:
                        graph.disable_guard_check()  # it has none; this skips binding the arguments per call
                        self._graphs[rows == 1] = graph
                    self.decode(backend, meta, ids)  # a first run: the graph's own warm-up (or its compile)
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

    @property
    def warm_up_graphs(self) -> int:
        """Graphs ready after ``warm_up``: compiled or loaded (only ``warm_up`` loads)."""
        return self.warm_up_compiles + self.loaded

    def _warmed(self, start: float) -> float:
        self.warm_up_s = time.perf_counter() - start
        self.warm_up_compiles = self.compiles
        logger.info("model step compiled in %.1f s (%d graphs compiled, %d loaded whole; inductor options %s)",
                    self.warm_up_s, self.compiles, self.loaded, self.options)
        return self.warm_up_s
