"""CPU ranks: gloo with DeepSpeed's shared-memory all-reduce, bf16 only where the CPU computes it natively."""

from __future__ import annotations

import logging

from raytp.errors import ConfigError
from raytp.platforms.base import Platform

logger = logging.getLogger(__name__)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512_BF16 or AMX). Without it torch emulates bf16 matmuls,
    measured 200x slower than float32 on an AVX2 host."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


class CpuPlatform(Platform):
    name = "cpu"
    ray_device_resource = None
    deepspeed_accelerator = "cpu"
    triton_compiles = False
    # measured on a 2-core host (docs/performance.md): 48 concurrent requests through the engine, max_num_seqs 8 /
    # 16 / 32 / 64; a CPU step's time grows with the batch, so past this the queue only moves into the batch
    default_max_num_seqs = 32
    default_max_num_batched_tokens = 512
    # compile_model: true - Inductor's defaults. The linears' weights are prepacked for oneDNN at load
    # (raytp.gang.linears), which is what freezing would do; without freezing the graph holds no weight and AOTAutograd
    # caches it, so a restart skips its tracing (docs/performance.md, "The compiled model step")
    inductor_options: dict = {}

    def torch_device(self) -> str:
        return "cpu"

    def backend(self, **probes) -> str:
        return "gloo"  # DeepSpeed swaps in its shared-memory all-reduce for AutoTP on CPU

    def check_available(self, *, has=None) -> None:
        return  # CPU ranks never lack a device

    def init_rank(self, rank: int, world_size: int, threads: int) -> None:
        import os

        import torch

        if os.environ.get("RAYTP_CPU_AFFINITY", "1") != "0":
            cores = self.rank_cpus(rank, world_size, threads, sorted(os.sched_getaffinity(0)))
            if cores:  # before torch starts its OpenMP threads: they inherit this thread's mask
                os.sched_setaffinity(0, cores)
        torch.set_num_threads(threads)

    @staticmethod
    def rank_cpus(rank: int, world_size: int, threads: int, allowed: list[int]) -> list[int]:
        """The cores rank ``rank`` pins its threads to — its own slice of the node's ``allowed`` cores — when the
        gang's threads fill the node exactly (so no other gang shares it); else [] (left to the OS, which cannot
        know which cores another gang's ranks would pin to). Without it, the OS moves a rank's OpenMP threads
        across cores and the two ranks' threads compete, while each step waits for the slower."""
        if world_size * threads != len(allowed):
            return []
        return allowed[rank * threads:(rank + 1) * threads]

    def check_dtype(self, dtype: str) -> None:
        if dtype == "float16":
            raise ConfigError("dtype", "float16 is not supported on cpu by DeepSpeed's CPU accelerator; "
                              "use bfloat16 or float32.")

    def resolve_dtype(self, requested: str, native_bf16=None) -> str:
        """On the node: 'auto' is bfloat16 where this CPU computes it natively, else float32 (``native_bf16``:
        the probe, injectable)."""
        self.check_dtype(requested)
        native = (native_bf16 or cpu_has_native_bf16)()
        if requested == "auto":
            dtype = "bfloat16" if native else "float32"
            logger.info("raytp: dtype auto -> %s (this CPU %s native bf16: AVX512_BF16/AMX)", dtype,
                        "has" if native else "lacks")
            return dtype
        if requested == "bfloat16" and not native:
            logger.warning("raytp: dtype bfloat16 on a CPU without native bf16 (AVX512_BF16/AMX): torch emulates "
                           "it and serving will be slow; float32 is much faster here")
        return requested

    def int4_config(self, group_size: int):
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=group_size)  # oneDNN/AVX-512 int4 GEMM

    def kv_cache_budget(self, configured: int | None, utilization: float) -> int:
        """``configured``, else 4 GiB (vLLM's CPU default)."""
        return configured if configured is not None else 4 << 30

    def graph_capture(self, enforce_eager: bool, world_size: int):
        """None (eager): there is no launch overhead for graphs to remove on a CPU."""
        return None

    @property
    def batch_decode(self) -> bool:
        return False  # without the decode kernel: a view of consecutive blocks costs no copy, a per-row call little

    @property
    def decode_kernel(self) -> bool:
        return True  # 2-4x faster than per-row einsums at 16 rows (the context is never copied nor upcast)

    @property
    def tiled_prefill(self) -> bool:
        return True  # as fast as torch's flash kernel here, and a prompt's numbers do not depend on its chunks
