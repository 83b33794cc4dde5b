"""Whole steps — decode-only and mixed (prompt chunks beside decode rows) — on fixed shapes, so that on CUDA
every step can be a graph replay, not only decode steps.

For a backend that attends ragged rows in one launch per layer (``backend.ragged``: the triton kernel, whose
grid depends only on the token and row counts), a step's shape is just its token count: a step of T tokens in
R rows is padded to the *token bucket* T' (1, 2, 4, ... ``max_tokens``, the config's max_num_batched_tokens)
with R' = min(T', ``max_rows``) rows — every bucket one graph, a dozen in all (vLLM's full-graph scheme for its
unified Triton attention). Padding never changes a real token:
  - padding rows are empty (no query token, context 0): the kernel's programs for them return at once;
  - padding tokens belong to no row: the kernel writes nothing for them, so the attention output starts as
    zeros (``meta.padded``) and they carry finite values through the layers; their keys and values go to slot 0
    of the null block, which no row reads unmasked;
  - the block tables keep their full width (the kernel never reads an entry past a row's context).
Logits are taken at each row's last token (a fixed index buffer of R' entries). Steps that ask for prompt
logprobs (logits at every prompt position) and steps beyond the largest bucket run eagerly.
"""

from __future__ import annotations

import torch

from raytp.gang.attention import AttentionBackend, AttentionMetadata, build_on_device
from raytp.gang.static_decode import FixedShapes, bucket_for, buckets


class StaticSteps(FixedShapes):
    """Runs steps of up to ``max_tokens`` tokens in up to ``max_rows`` rows, each row's table up to ``max_blocks``
    blocks wide, on token buckets (module docstring)."""

    def __init__(self, model, backend: AttentionBackend, device: str, *, max_tokens: int, max_rows: int,
                 max_blocks: int, mode: str):
        super().__init__(model, backend, device, mode)
        self.max_rows = max_rows
        self.token_sizes = buckets(max_tokens)
        long = dict(dtype=torch.long, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        self.ids = torch.zeros((1, max_tokens), **long)
        self.positions = torch.zeros((1, max_tokens), **long)
        self.slots = torch.zeros(max_tokens, **long)
        self.query_start_loc = torch.zeros(max_rows + 1, **i32)
        self.seq_lens = torch.zeros(max_rows, **i32)
        self.tables = torch.zeros((max_rows, max_blocks), **i32)
        self.keep = torch.zeros(max_rows, **long)
        self._metas = {t: AttentionMetadata(
            query_start_loc=self.query_start_loc[:self._rows(t) + 1], seq_lens=self.seq_lens[:self._rows(t)],
            block_tables=self.tables[:self._rows(t)], slot_mapping=self.slots[:t], positions=self.positions[:, :t],
            fresh_blocks=None, num_tokens=t, num_rows=self._rows(t), padded=True) for t in self.token_sizes}
        # the dummy step the buffers hold for capture: every row empty, every token padding

    def _rows(self, num_tokens: int) -> int:
        return min(num_tokens, self.max_rows)

    def bucket_keys(self) -> list[int]:
        return self.token_sizes

    def accepts(self, rows) -> int | None:
        """The token bucket of a step's rows, or None if the step must run eagerly."""
        if len(rows) > self.max_rows or any(r.prompt_targets for r in rows):
            return None
        return bucket_for(sum(len(r.token_ids) for r in rows), self.token_sizes)

    @torch.inference_mode()
    def run(self, rows, bucket: int, tables: torch.Tensor) -> torch.Tensor:
        """Logits [len(rows), V] at each row's last token (writing every row's new KV into its blocks).
        ``tables``: the rank's device block tables, row ``r.slot`` for each row."""
        t, r = bucket, self._rows(bucket)
        layout = [(len(row.token_ids), row.start_pos, row.block_table) for row in rows]
        meta = build_on_device(layout, self.pool.block_size, tables, [row.slot for row in rows])
        n, m, width = meta.num_tokens, meta.num_rows, meta.block_tables.shape[1]
        ids = torch.tensor([tok for row in rows for tok in row.token_ids], dtype=torch.long)
        self.ids[0, :n].copy_(ids.to(self.device, non_blocking=True))
        self.ids[0, n:t].zero_()
        self.positions[0, :n].copy_(meta.positions[0])
        self.positions[0, n:t].zero_()
        self.slots[:n].copy_(meta.slot_mapping)
        self.slots[n:t].zero_()  # padding tokens write slot 0 of the null block
        self.query_start_loc[:m + 1].copy_(meta.query_start_loc)
        self.query_start_loc[m + 1:r + 1].fill_(n)  # empty padding rows
        self.seq_lens[:m].copy_(meta.seq_lens)
        self.seq_lens[m:r].zero_()
        self.tables[:m, :width].copy_(meta.block_tables)
        self.keep[:m].copy_(meta.query_start_loc[1:] - 1)
        self.keep[m:r].zero_()
        return self._replay(bucket)[:m]

    def _model_forward(self, key: int) -> torch.Tensor:
        t, r = key, self._rows(key)
        out = self.model(input_ids=self.ids[:, :t], position_ids=self.positions[:, :t], use_cache=False,
                         logits_to_keep=self.keep[:r], raytp_backend=self.backend, raytp_meta=self._metas[t])
        return out.logits[0]
