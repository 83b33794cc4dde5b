"""The only importer of deepspeed and ipex_llm: process group → load on CPU → AutoTP → low-bit → device.

The order is upstream DeepSpeed/IPEX-LLM examples' own, and the only one that works: quantizing
before AutoTP fails because low-bit weights are flat uint8 tensors DeepSpeed cannot
split, and ``lm_head`` must stay unconverted because IPEX-LLM converts DeepSpeed's
sharded ``LmHeadLinearAllreduce`` wrongly.
"""

from __future__ import annotations

import datetime
import logging

import torch

from raytp.compat import dtype_kwarg
from raytp.config import ResolvedConfig

logger = logging.getLogger(__name__)


def init_distributed(backend: str, master_addr: str, master_port: int, rank: int, world_size: int,
                     timeout_s: float) -> None:
    """Join the gang's process group through DeepSpeed, so its CPU shm all-reduce is set up with it."""
    import deepspeed

    deepspeed.init_distributed(
        dist_backend=backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        auto_mpi_discovery=False,
    )


def shm_buffer_paths(master_addr: str, master_port: int | str, rank: int | str = "*") -> list[str]:
    """DeepSpeed's CPU shm all-reduce buffers of one gang (its rendezvous address) in /dev/shm: one rank's, or
    all (``rank="*"``). DeepSpeed names them ``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``."""
    import glob
    import os

    return glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{master_port}_{rank}")


def load_shard(cfg: ResolvedConfig, rank: int, device: str) -> torch.nn.Module:
    """Return this rank's shard of the model, on ``device``, in eval mode."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, cfg.dtype)
    tp = cfg.tensor_parallel_size
    # 1. Load on CPU. low_cpu_mem_usage avoids a second full copy while weights are read.
    logger.info("rank %d: loading %s on cpu (%s)", rank, cfg.model_path, cfg.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model_path, trust_remote_code=cfg.trust_remote_code, low_cpu_mem_usage=True, **dtype_kwarg(dtype)
    )
    model.eval()
    # 2. AutoTP: DeepSpeed splits attention/MLP linears across the group and all-reduces inside forward.
    if tp > 1:
        import deepspeed

        logger.info("rank %d: sharding with DeepSpeed AutoTP, tp_size=%d", rank, tp)
        engine = deepspeed.init_inference(
            model,
            tensor_parallel={"tp_size": tp},
            dtype=dtype,
            replace_with_kernel_inject=False,
            keep_module_on_host=True,  # the shard moves to its device in step 4, after quantization
        )
        model = engine.module
    # 3. Low-bit weights for this rank's shard only.
    if cfg.low_bit:
        from ipex_llm import optimize_model

        logger.info("rank %d: IPEX-LLM optimize_model(low_bit=%s)", rank, cfg.low_bit)
        # optimize_llm=False: convert the linears only. Its model-level rewrites replace HF's attention and cache
        # with IPEX-LLM's own, which would bypass raytp's paged KV cache (raytp.gang.paged_attention).
        model = optimize_model(model, low_bit=cfg.low_bit, modules_to_not_convert=["lm_head"], optimize_llm=False)
    # 4. To the rank's device.
    if device != "cpu":
        model = model.to(device)
    return model
