"""One rank's running batch: its rows, their HF KV cache, and one verb, ``step(StepInput) -> StepOutput``.

Every rank of a gang holds the same rows in the same order and runs the same forward
(DeepSpeed AutoTP all-reduces inside it). Rank 0 samples and broadcasts the tokens, so
ranks never decide anything on their own and cannot diverge.

KV cache: the HF dynamic cache the model itself returns, one [rows, kv_heads, seq,
head_dim] tensor pair per layer (AutoTP only splits linears, so each rank's tensors
hold its share of heads). Rows are left-padded to a common length and masked, the
approach TGI takes for HF models: a finished row is removed with ``index_select``; each
new row is prefilled on its own (no padding) and concatenated, the shorter side left-padded.
Both are plain tensor ops that work the same on every device and transformers version
(``raytp.compat`` reads and writes the per-layer tensors), with no paged-attention kernel.
"""

from __future__ import annotations

import logging

import torch

from raytp.compat import cache_arg_name, cache_kv, empty_cache, logits_to_keep_kwarg, output_cache, set_cache_kv
from raytp.gang.sampler import make_generator, sample
from raytp.messages import SeqInput, StepInput, StepOutput

logger = logging.getLogger(__name__)


def decoder_layers(model) -> list:
    """The model's transformer blocks: HF names them ``*DecoderLayer``; else the longest ``ModuleList``."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else [model]


class ModelRunner:
    def __init__(self, model, device: str, rank: int, world_size: int):
        self.model = model
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self._cache_arg = cache_arg_name(model)
        self._keep_last = logits_to_keep_kwarg(model)  # prefill computes lm_head for the last position only
        # Decoder layers run so far; read from another thread by the worker's liveness ping, so the executor can
        # tell a slow step (the count moves) from a hung one (it does not).
        self.progress = 0
        for layer in decoder_layers(model):
            layer.register_forward_hook(self._count_layer)
        self._reset()

    def _count_layer(self, *_args) -> None:
        self.progress += 1

    def _reset(self) -> None:
        self.rows: list[str] = []
        self.params = []
        self.generators = []
        self.cache = None
        self.mask = None  # [rows, seq] 1 = real token
        self.last_pos = None  # [rows] position of each row's last token
        self.last_tokens = None  # [rows]

    @torch.inference_mode()
    def step(self, step: StepInput) -> StepOutput:
        """1. drop the ``finished_ids`` rows; 2. prefill the ``new`` rows (their first tokens), or
        3. if ``decode``, one token for every row, in row order. Only rank 0's output carries tokens."""
        if step.finished_ids:
            logger.debug("rank %d: drop %d rows", self.rank, len(step.finished_ids),
                         extra={"request_ids": list(step.finished_ids)})
            self._drop(set(step.finished_ids))
        tokens = self._prefill(step.new) if step.new else self._decode() if step.decode else None
        return StepOutput(tuple(tokens.tolist())) if tokens is not None and self.rank == 0 else StepOutput()

    def _drop(self, finished: set[str]) -> None:
        keep = [i for i, r in enumerate(self.rows) if r not in finished]
        if not keep:
            self._reset()
            return
        idx = torch.tensor(keep, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        self.params = [self.params[i] for i in keep]
        self.generators = [self.generators[i] for i in keep] if self.generators else []
        self.mask, self.last_pos, self.last_tokens = self.mask[idx], self.last_pos[idx], self.last_tokens[idx]
        # columns that are padding in every remaining row are dead weight: trim them
        start = int((self.mask.sum(0) > 0).nonzero()[0])
        self.mask = self.mask[:, start:]
        set_cache_kv(self.cache, [(k[idx, :, start:], v[idx, :, start:]) for k, v in cache_kv(self.cache)])

    def _prefill(self, new: tuple[SeqInput, ...]) -> torch.Tensor:
        # Each prompt runs as its own forward: a batch of prompts would be padded to the longest one, and on
        # compute-bound prefill that padding is paid in full (~40% for prompts of 64-256 tokens). One prompt is
        # already a large enough matrix product. The tokens are sampled together: one broadcast per step.
        logits, caches = [], []
        for s in new:
            logger.info("rank %d: prefill %d prompt tokens", self.rank, len(s.prompt_ids),
                        extra={"request_id": s.seq_id})
            ids = torch.tensor([s.prompt_ids], dtype=torch.long, device=self.device)
            positions = torch.arange(ids.shape[1], device=self.device).unsqueeze(0)
            row_logits, cache = self._forward(ids, torch.ones_like(ids), positions, empty_cache())
            logits.append(row_logits)
            caches.append(cache)
        params = [s.params for s in new]
        generators = [make_generator(p, self.device) for p in params] if self.rank == 0 else []
        tokens = self._sample(torch.cat(logits), params, generators)
        for i, (s, cache) in enumerate(zip(new, caches)):
            n = len(s.prompt_ids)
            mask = torch.ones((1, n), dtype=torch.long, device=self.device)
            last_pos = torch.tensor([n - 1], device=self.device)
            self._merge([s.seq_id], params[i:i + 1], generators[i:i + 1], cache, mask, last_pos, tokens[i:i + 1])
        return tokens

    def _decode(self) -> torch.Tensor:
        ones = torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        self.last_pos = self.last_pos + 1
        logits, self.cache = self._forward(self.last_tokens.unsqueeze(1), self.mask, self.last_pos.unsqueeze(1),
                                           self.cache)
        self.last_tokens = self._sample(logits, self.params, self.generators)
        return self.last_tokens

    def _merge(self, rows, params, generators, cache, mask, last_pos, tokens) -> None:
        if not self.rows:
            self.rows, self.params, self.generators = rows, params, generators
            self.cache, self.mask, self.last_pos, self.last_tokens = cache, mask, last_pos, tokens
            return
        old_len, new_len = self.mask.shape[1], mask.shape[1]
        length = max(old_len, new_len)

        def pad(t: torch.Tensor, dim: int, n: int) -> torch.Tensor:
            if n == 0:
                return t
            shape = list(t.shape)
            shape[dim] = n
            return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)

        merged = [
            (torch.cat([pad(k0, 2, length - old_len), pad(k1, 2, length - new_len)]),
             torch.cat([pad(v0, 2, length - old_len), pad(v1, 2, length - new_len)]))
            for (k0, v0), (k1, v1) in zip(cache_kv(self.cache), cache_kv(cache))
        ]
        set_cache_kv(self.cache, merged)
        self.mask = torch.cat([pad(self.mask, 1, length - old_len), pad(mask, 1, length - new_len)])
        self.rows += rows
        self.params += params
        self.generators += generators
        self.last_pos = torch.cat([self.last_pos, last_pos])
        self.last_tokens = torch.cat([self.last_tokens, tokens])

    def _forward(self, input_ids, mask, positions, cache):
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self._cache_arg: cache}, **self._keep_last)
        return out.logits[:, -1, :], output_cache(out)

    def _sample(self, logits, params, generators) -> torch.Tensor:
        if self.rank == 0:
            tokens = sample(logits, params, generators)
        else:
            tokens = torch.empty(logits.shape[0], dtype=torch.long, device=self.device)
        if self.world_size > 1:
            import torch.distributed as dist

            dist.broadcast(tokens, src=0)
        return tokens
