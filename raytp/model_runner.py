"""One rank's batch state: a left-padded batch, its HF KV cache, and the prefill / decode verbs.

Every rank of a gang holds the same batch and runs the same forward (DeepSpeed AutoTP
all-reduces inside it). Rank 0 samples the next tokens and broadcasts them, so ranks
never decide anything on their own and cannot diverge. The KV cache is the HF
``past_key_values`` object that the model itself returns: AutoTP only replaces linear
layers, so the cache holds this rank's share of heads and needs no special handling.
"""

from __future__ import annotations

import torch

from raytp.compat import cache_arg_name, output_cache
from raytp.engine.types import SeqInput
from raytp.sampler import make_generator, sample


class ModelRunner:
    def __init__(self, model, device: str, rank: int, world_size: int, pad_token_id: int = 0):
        self.model = model
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.pad_token_id = pad_token_id
        self._cache_arg = cache_arg_name(model)
        self._reset()

    def _reset(self) -> None:
        self.params = []
        self.generators = []
        self.cache = None
        self.attention_mask = None
        self.positions = None
        self.last_tokens = None

    @torch.inference_mode()
    def prefill(self, seqs: list[SeqInput]) -> list[int] | None:
        """Start a new batch with ``seqs`` (replacing any previous one); return first tokens (rank 0)."""
        self._reset()
        longest = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding keeps every row's last token in the last column
            ids[i, longest - len(s.prompt_ids):] = torch.tensor(s.prompt_ids, dtype=torch.long)
            mask[i, longest - len(s.prompt_ids):] = 1
        self.params = [s.params for s in seqs]
        if self.rank == 0:
            self.generators = [make_generator(p, self.device) for p in self.params]
        self.attention_mask = mask.to(self.device)
        positions = (self.attention_mask.cumsum(-1) - 1).clamp(min=0)
        return self._forward(ids.to(self.device), positions)

    @torch.inference_mode()
    def decode(self) -> list[int] | None:
        """One decode step for every row of the current batch; return the new tokens (rank 0)."""
        assert self.cache is not None, "decode before prefill"
        ones = torch.ones((self.attention_mask.shape[0], 1), dtype=self.attention_mask.dtype, device=self.device)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        return self._forward(self.last_tokens.unsqueeze(1), self.positions[:, -1:] + 1)

    def release(self) -> None:
        """Drop the batch and its KV cache."""
        self._reset()

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> list[int] | None:
        out = self.model(
            input_ids=input_ids,
            attention_mask=self.attention_mask,
            position_ids=positions,
            use_cache=True,
            **{self._cache_arg: self.cache},
        )
        self.cache = output_cache(out)
        self.positions = positions
        logits = out.logits[:, -1, :]
        if self.rank == 0:
            tokens = sample(logits, self.params, self.generators)
        else:
            tokens = torch.empty(logits.shape[0], dtype=torch.long, device=self.device)
        if self.world_size > 1:
            import torch.distributed as dist

            dist.broadcast(tokens, src=0)
        self.last_tokens = tokens
        return tokens.tolist() if self.rank == 0 else None
