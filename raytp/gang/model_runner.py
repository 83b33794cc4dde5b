"""One rank's forward over a step: flat, unpadded tokens of every row through the model, attention over the
rank's paged KV cache through the rank's attention backend (``raytp.gang.attention``), then every rank samples.

Every rank of a gang runs the same ``StepInput`` (DeepSpeed AutoTP all-reduces inside the forward) and
holds the same KV blocks for its own heads. Ranks keep what they need of each live sequence (its sampling
parameters and block table, ``raytp.gang.requests``) from the step it joins until the step that says it left;
each step carries only the tokens, new blocks and arrivals (and sampling draws are a function of seed and
position), so the driver alone decides what runs and where it is stored.

Ranks are SPMD down to sampling: the all-reduce leaves every rank the same logits, bit for bit (gloo, DeepSpeed's
shm op and NCCL hand every rank the one reduced result: ``docs/performance.md``), and the sampler is a pure
function of logits, parameters and position, so every rank draws the same tokens and records them. A row whose
input is last step's token (``PENDING_TOKEN``, async scheduling) is filled from the rank's own record: nothing is
broadcast and nothing waits on the host before a forward. Only rank 0 returns what it sampled.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import replace

import torch

from raytp.errors import ConfigError
from raytp.gang import attention
from raytp.gang.attention import hf
from raytp.gang.compiled import CompiledModel
from raytp.gang.graph_runner import GraphRunner
from raytp.gang.requests import RankRequests
from raytp.gang.sampler import prompt_token_logprobs, sample, token_logprobs
from raytp.messages import StepInput, StepOutput

logger = logging.getLogger(__name__)


def decoder_layers(model) -> list:
    """The model's transformer blocks: HF names them ``*DecoderLayer``; else the longest ``ModuleList``."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else [model]


class ModelRunner:
    """``kv_cache_bytes``: this rank's KV budget; ``max_blocks``: most blocks worth allocating (more would never be
    used). The pool is sized by a one-token probe forward that records every layer's key shape on this rank.
    ``attention_backend``: a name of ``raytp.gang.attention.BACKENDS`` (transformers 4.x has one path, the
    compatibility adapter, whatever is asked). ``graph_capture``: the platform's capture strategy
    (``Platform.graph_capture``); with it, the steps the backend's bucket policy accepts are replayed graphs.
    ``compile_options``: Inductor options to compile the model step with (``raytp.gang.compiled``); None: eager.
    ``batch_invariant``: attention computes a row the same way whatever else the step holds."""

    def __init__(self, model, device: str, rank: int, world_size: int, *, block_size: int = 16,
                 kv_cache_bytes: int = 1 << 30, max_blocks: int | None = None, graph_capture=None,
                 max_batch: int = 8, max_model_len: int = 2048, attention_backend: str = "sdpa",
                 max_step_tokens: int = 512, compile_options: dict | None = None, batch_invariant: bool = False):
        self.model = model
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.block_size = block_size
        self.requests = RankRequests()
        # the live sequences' block tables on the device, one row per slot, written in place as they grow
        self.tables = torch.zeros((max(1, max_batch), -(-max_model_len // block_size)), dtype=torch.int32,
                                  device=device)
        self._interface = hf.register()
        if self._interface:
            model.set_attn_implementation(hf.ATTN_NAME)
        else:
            self._legacy_cache = hf.legacy_cache_cls()
        self._keep_kwarg = "logits_to_keep" if "logits_to_keep" in inspect.signature(model.forward).parameters \
            else None
        # Decoder layers run so far; read from another thread by the worker's liveness ping, so the executor can
        # tell a slow step (the count moves) from a hung one (it does not).
        self.progress = 0
        self.compiled = None
        for layer in decoder_layers(model):
            layer.register_forward_hook(self._count_layer)
        shapes = self._probe()
        self.block_bytes = attention.KVPool.block_bytes(shapes, block_size)
        num_blocks = max(0, kv_cache_bytes // self.block_bytes)
        if max_blocks is not None:
            num_blocks = min(num_blocks, max_blocks)
        self.pool = attention.KVPool(shapes, num_blocks, block_size, device) if num_blocks >= 2 else None
        self.num_blocks = num_blocks
        self.attention_backend = attention_backend if self._interface else "legacy"
        self.backend = None
        if self.pool is not None and self._interface:
            from raytp import platforms

            platform = platforms.get(torch.device(device).type)
            options = ({"batch_decode": platform.batch_decode, "tiled_prefill": platform.tiled_prefill,
                        "decode_kernel": platform.decode_kernel, "batch_invariant": batch_invariant}
                       if attention_backend == "sdpa" else {})
            self.backend = attention.create(attention_backend, self.pool, **options)
            self._warm_up_backend()
        # the model step compiled once (a compiled step counts as one unit of progress)
        if compile_options is not None and self.backend is not None and self._keep_kwarg:
            self._compile(compile_options)
        # steps on fixed shapes replayed as graphs: the backend's bucket policy, the platform's capture (None: eager)
        self.graphs = None
        shapes = None
        if graph_capture is not None and self.backend is not None and self._keep_kwarg:
            shapes = self.backend.shapes(max_tokens=max(max_step_tokens, max_batch), max_rows=max_batch,
                                         max_blocks=-(-max_model_len // block_size))
        if shapes is not None:
            self.graphs = GraphRunner(model, self.backend, shapes, graph_capture)
            self.graphs.warm_up()

    @classmethod
    def for_config(cls, model, config, rank: int, device: str) -> ModelRunner:
        """The runner a ``ResolvedConfig`` describes: its block size and KV budget (asked of the platform after
        the shard is loaded), and never more blocks than max_num_seqs full-length sequences could use twice over
        (the spare half keeps cached prefixes)."""
        from raytp import platforms

        platform = platforms.get(config.device)
        budget = platform.kv_cache_budget(config.kv_cache_memory_bytes, config.gpu_memory_utilization)
        per_seq = -(-config.max_model_len // config.block_size)
        runner = cls(model, device, rank, config.tensor_parallel_size, block_size=config.block_size,
                   kv_cache_bytes=budget, max_blocks=2 * config.max_num_seqs * per_seq + 1,
                   graph_capture=platform.graph_capture(config.enforce_eager, config.tensor_parallel_size),
                   max_batch=config.max_num_seqs, max_model_len=config.max_model_len,
                   attention_backend=platform.attention_backend(config.attention_backend),
                   max_step_tokens=config.max_num_batched_tokens,
                   compile_options=platform.compile_options(config.enforce_eager, config.compile_model),
                   batch_invariant=config.batch_invariant)
        if config.batch_invariant and not getattr(runner.backend, "tiled_prefill", False):
            raise ConfigError("batch_invariant", f"needs the sdpa attention backend over the paged cache (here: "
                              f"{runner.attention_backend}; transformers >= 5 provides the attention interface).")
        return runner

    def _compile(self, options: dict) -> None:
        """Compile the model step now (``CompiledModel.warm_up``). A model the compiler cannot take (an operator
        it cannot lower, a missing toolchain) runs eagerly, with a warning: compiling is an optimisation, which must
        not keep a config that serves eagerly from starting (``LoadReport.decode_mode`` says which ran)."""
        compiled = CompiledModel(self.model, options, decode_only=self.backend.graph_decode is not None)
        try:
            compiled.warm_up(self.backend, self.device)
        except Exception as e:  # noqa: BLE001 - Dynamo and Inductor raise many types
            cause = getattr(e, "inner_exception", None) or e  # Dynamo wraps the compiler's own error
            logger.warning("rank %d: compile_model: the model step could not be compiled (%s: %s); steps run "
                           "eagerly", self.rank, type(cause).__name__, (str(cause).splitlines() or [""])[0][:300])
            self.pool.zero_null_block()  # a warm-up step may have written it before failing
            return
        self.compiled = compiled

    def _count_layer(self, *_args) -> None:
        if not torch.compiler.is_compiling():  # traced, the count would be a guard: a recompile per step
            self.progress += 1

    @torch.inference_mode()
    def _warm_up_backend(self) -> None:
        """A decode step of two one-token rows in the null block before any request, so the backend's kernels are
        built now (the CPU decode kernel, Triton's JIT), not in a request's first step; the null block is zeroed
        after."""
        layout = [(1, 0, (0,)), (1, 0, (0,))]
        with torch.inference_mode():
            meta = attention.build(layout, self.block_size, self.device)
            self.backend.prepare(meta, layout)
            zero = torch.zeros(2, dtype=torch.long, device=self.device)
            self._forward(meta, zero[None], zero)
            self.pool.zero_null_block()

    def _probe(self) -> dict:
        """Each layer's (kv heads, head dim, dtype) on this rank, from a one-token forward (AutoTP and low-bit
        shards included: what the layers really produce, not what the config says)."""
        shapes: dict = {}
        meta = attention.build([(1, 0, (0,))], 1, self.device)
        self._forward(meta, torch.zeros((1, 1), dtype=torch.long, device=self.device),
                      torch.zeros(1, dtype=torch.long, device=self.device), probe=shapes)
        if not shapes:
            raise RuntimeError("the model's attention never reached raytp's paged attention (unsupported model)")
        return shapes

    @torch.inference_mode()
    def step(self, step: StepInput) -> StepOutput:
        """Compute every row's tokens (writing their KV into their blocks), then sample one token per row with
        ``sample`` set. Only rank 0's output carries tokens."""
        rows = self.requests.apply(step)
        for r in rows:
            if len(r.token_ids) > 1:  # prompt chunks (never their text): which request, how much, from where
                logger.info("rank %d: prefill %d tokens from position %d", self.rank, len(r.token_ids), r.start_pos,
                            extra={"request_id": r.seq_id})
        if not rows:
            return StepOutput()
        self._sync_tables()
        bucket = self.graphs.accepts(rows) if self.graphs is not None else None
        if bucket is not None:
            self.progress += 1  # a replayed graph runs no layer hooks
            return self._sample_rows(self.graphs.run(rows, bucket, self.tables), rows)  # at each row's last token
        layout = [(len(r.token_ids), r.start_pos, r.block_table) for r in rows]
        meta = attention.build_on_device(layout, self.block_size, self.tables, [r.slot for r in rows])
        if self.compiled is not None and self.compiled.decode_only and \
                all(len(r.token_ids) == 1 and not r.prompt_targets for r in rows):
            self.progress += 1  # (as a replayed graph: no layer hooks run)
            ids = torch.tensor([[r.token_ids[0] for r in rows]], dtype=torch.long, device=self.device)
            return self._sample_rows(self.compiled.decode(self.backend, meta, ids), rows)
        if self.backend is not None:
            self.backend.prepare(meta, layout)
        ids = torch.tensor([[t for r in rows for t in r.token_ids]], dtype=torch.long, device=self.device)
        # positions whose logits are needed: each sampled row's last one, and for rows asking for prompt logprobs
        # every position whose next token is a prompt token (logits at p score the token at p + 1)
        keep, sampled_at, prompt_rows, offset = [], [], [], 0
        for r in rows:
            n = len(r.token_ids)
            targets = r.prompt_targets
            if targets:
                prompt_rows.append((r, len(keep), targets))
                keep.extend(range(offset, offset + len(targets)))
            if r.sample:
                sampled_at.append(len(keep))
                keep.append(offset + n - 1)
            offset += n
        if not keep:  # only prompt chunks that do not finish their prompts: fill the cache, sample nothing
            if self.compiled is None or self.compiled.decode_only:
                self._forward(meta, ids, None)
                return StepOutput()
            keep = [offset - 1]  # the compiled step always keeps logits: one row more beats an eager step
        logits = self._forward(meta, ids, torch.tensor(keep, dtype=torch.long, device=self.device))
        out = self._sample(logits[sampled_at], [r for r in rows if r.sample]) if sampled_at else StepOutput()
        if prompt_rows and self.rank == 0:
            out = replace(out, prompt_logprobs=prompt_token_logprobs(logits, prompt_rows))
        return out

    def _sync_tables(self) -> None:
        """Write the table entries this step's arrivals and rows added into the device tables (one copy)."""
        writes = self.requests.take_table_writes()
        if not writes:
            return
        slots, cols = self.tables.shape
        need = (max(self.requests.num_slots, slots), max(cols, 1 + max(c for _, c, _ in writes)))
        if need != (slots, cols):  # more live sequences or longer tables than sized for: grow, keep the rows
            grown = torch.zeros(need, dtype=torch.int32, device=self.device)
            grown[:slots, :cols] = self.tables
            self.tables = grown
        width = self.tables.shape[1]
        host = torch.tensor([[s * width + c for s, c, _ in writes], [b for _, _, b in writes]], dtype=torch.long)
        index, blocks = host.to(self.device, non_blocking=True)
        self.tables.view(-1).index_copy_(0, index, blocks.int())

    def _sample_rows(self, logits, rows) -> StepOutput:
        """Sample the rows that ask for it from ``logits`` [len(rows), V] (one position per row)."""
        sampled = [i for i, r in enumerate(rows) if r.sample]
        if not sampled:
            return StepOutput()
        return self._sample(logits if len(sampled) == len(rows) else logits[sampled], [rows[i] for i in sampled])

    def _sample(self, logits, rows) -> StepOutput:
        """Every rank samples one token per row from its logits row (the same logits, so the same tokens) and
        records them as the next step's pending inputs; rank 0 returns them, with logprobs if asked."""
        params, positions = [r.params for r in rows], [r.start_pos + len(r.token_ids) for r in rows]
        contexts = [(r.history + r.token_ids, r.num_prompt_tokens) for r in rows]
        allowed = [r.allowed for r in rows]
        tokens = sample(logits, params, positions, contexts, allowed)
        chosen = tuple(tokens.tolist())  # after the forward: the step's one host sync
        self.requests.record_sampled([r.slot for r in rows], chosen)
        if self.rank != 0:
            return StepOutput()
        logprobs = ()
        if any(p.logprobs is not None for p in params):
            logprobs = tuple(token_logprobs(logits, params, positions, contexts, tokens, allowed))
        return StepOutput(chosen, logprobs)

    def _forward(self, meta: attention.AttentionMetadata, ids, keep, probe: dict | None = None):
        """Logits [len(keep), V] of the positions ``keep`` (None: run for the cache only). No backend, no pool:
        the shape probe (plain attention over the given tokens)."""
        if self.compiled is not None and not self.compiled.decode_only and probe is None and keep is not None:
            self.progress += 1
            return self.compiled(self.backend, meta, ids, keep)
        if self._interface:
            extra = {"raytp_probe": probe} if probe is not None else \
                {"raytp_backend": self.backend, "raytp_meta": meta}
            if self._keep_kwarg and keep is not None:
                out = self.model(input_ids=ids, position_ids=meta.positions, use_cache=False,
                                 **{self._keep_kwarg: keep}, **extra)
                return out.logits[0]
            hidden = self.model.get_decoder()(input_ids=ids, position_ids=meta.positions, use_cache=False, **extra)
        else:
            legacy = hf.LegacyStep(self.pool if probe is None else None, meta)
            hidden = self.model.get_decoder()(input_ids=ids, position_ids=meta.positions,
                                              attention_mask=legacy.mask(self.model.dtype),
                                              past_key_values=self._legacy_cache(legacy, probe), use_cache=True)
        if keep is None:
            return None
        # [1, K, H] in: DeepSpeed's sharded lm_head (LmHeadLinearAllreduce) slices a 3-D input
        return self.model.get_output_embeddings()(hidden.last_hidden_state[:, keep])[0]
