"""Where deepspeed, ipex_llm and torchao are imported (with ``raytp.gang.linears``): process group → load on CPU →
AutoTP → low-bit → device.

The order is upstream DeepSpeed/IPEX-LLM examples' own, and the only one that works: quantizing
before AutoTP fails because low-bit weights are flat uint8 tensors DeepSpeed cannot
split, and ``lm_head`` must stay unconverted because IPEX-LLM converts DeepSpeed's
sharded ``LmHeadLinearAllreduce`` wrongly.

torchao (``quantization``) runs after the move to the device, because its packed int4 layouts are made by
the device's own packing op (tinygemm's on CUDA, oneDNN's on XPU, the CPU's ``_weight_int4pack_mm_for_cpu``).
DeepSpeed's AutoTP layers compute ``matmul(x, weight.T)``, which torchao's weight tensors do not implement, so
each is first turned into a plain ``nn.Linear`` over the same shard (``raytp.gang.linears``): torchao then
quantizes them like any linear. Unquantized CPU weights are prepacked for oneDNN instead (``prepack_weights``).
"""

from __future__ import annotations

import datetime
import logging

import torch

from raytp.compat import dtype_kwarg
from raytp.config import ResolvedConfig
from raytp.errors import ConfigError
from raytp.gang import cpu_linear
from raytp.gang.linears import can_prepack, plain_linears, prepack_linears, release_checkpoint

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
        # with IPEX-LLM's own, which would bypass raytp's paged KV cache (raytp.gang.attention).
        model = optimize_model(model, low_bit=cfg.low_bit, modules_to_not_convert=["lm_head"], optimize_llm=False)
    # 4. To the rank's device.
    if device != "cpu":
        model = model.to(device)
    # 5. torchao weight-only quantization of this rank's shard, by the device's kernels; or, on CPU, the plain
    #    weights prepacked for oneDNN.
    if cfg.quantization:
        quantize_shard(model, cfg.quantization, device, cfg.quantization_group_size, head=cfg.quantize_lm_head)
    elif cfg.prepack_weights and not cfg.low_bit and device == "cpu" and can_prepack(dtype):
        # (compile_model too: under the CPU's `freezing` the packed weights are the graph's constants, no copy)
        if tp > 1:
            plain_linears(model, head=True)
        kernel = cpu_linear.kernel_for(dtype, cfg.cpu_linear_kernel)
        packed = prepack_linears(model, min_rows=2 if cfg.batch_invariant else 1, kernel=kernel)
        logger.info("rank %d: %d linears prepacked for %s's kernel", rank, packed, kernel)
        release_checkpoint(model)
    elif cfg.batch_invariant:
        raise ConfigError("batch_invariant", f"needs oneDNN's prepacked linears, which this rank's CPU cannot run "
                          f"in {dtype} (no native bf16?); use dtype float32.")
    return model


def group_size_for(in_features: list[int], requested: int | None) -> int:
    """torchao's quantization group: ``requested``, else the largest of 128/64/32 dividing every linear's input
    width on this shard (a row-parallel shard has 1/tp of it). ``ConfigError`` if none does."""
    choices = (requested,) if requested else (128, 64, 32)
    for g in choices:
        if all(n % g == 0 for n in in_features):
            return g
    from raytp.errors import ConfigError

    raise ConfigError("quantization_group_size", f"no group size in {choices} divides every linear's input width on "
                      f"this shard ({sorted(set(in_features))}); set quantization_group_size to one that does.")


def torchao_config(fmt: str, device: str, group_size: int):
    """The torchao config for raytp's ``quantization`` value on ``device`` (cpu, cuda, xpu): weight-only int4 in
    each device's packed layout (``Platform.int4_config``), weight-only int8, fp8 weights with fp8 activations
    (CUDA SM >= 8.9)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig, PerRow

    from raytp import platforms

    if fmt == "int8":
        return Int8WeightOnlyConfig()
    if fmt == "fp8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    return platforms.get(torch.device(device).type).int4_config(group_size)


def quantize_shard(model: torch.nn.Module, fmt: str, device: str, group_size: int | None = None, *,
                   head: bool = False) -> None:
    """torchao ``fmt`` on every linear of this rank's shard; the LM head too with ``head`` (embeddings never: they
    are not linears; a head tied to them gets its own quantized copy)."""
    from torchao.quantization import quantize_

    from raytp import platforms

    platforms.get(torch.device(device).type).check_quantization_on_rank(fmt, device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        plain_linears(model, head=head)
    out_head = model.get_output_embeddings()
    if head and fmt == "int4" and out_head.out_features % 16:
        from raytp.errors import ConfigError

        raise ConfigError("quantize_lm_head", f"int4 packs weights in rows of 16 and this model's vocabulary "
                          f"({out_head.out_features} rows) is not a multiple of 16: use quantization int8.")
    chosen = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and (head or m is not out_head)]
    g = group_size_for([m.in_features for m in chosen], group_size) if fmt == "int4" else 0
    logger.info("torchao %s on %d linears of this shard%s", fmt, len(chosen), f" (group size {g})" if g else "")
    ids = {id(m) for m in chosen}
    quantize_(model, torchao_config(fmt, device, g), filter_fn=lambda m, _fqn: id(m) in ids)
