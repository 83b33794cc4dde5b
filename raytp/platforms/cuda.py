"""NVIDIA GPUs: nccl, CUDA graphs for decode on one device, tinygemm int4, fp8 from compute capability 8.9."""

from __future__ import annotations

from raytp.errors import ConfigError
from raytp.platforms.base import Platform


class CudaPlatform(Platform):
    name = "cuda"
    deepspeed_accelerator = "cuda"
    quantizations = ("int4", "int8", "fp8")
    install_hint = "install a CUDA build of torch and the NVIDIA driver"

    def backend(self, **probes) -> str:
        return "nccl"

    def quantized_dtype(self, fmt: str | None, requested: str, dtype: str) -> str:
        if fmt != "int4":
            return dtype
        if requested == "auto":
            return "bfloat16"  # tinygemm's int4 kernel computes in bf16 only
        if dtype != "bfloat16":
            raise ConfigError("dtype", f"{dtype} with quantization int4 on cuda: torchao's int4 CUDA kernel "
                              "(tinygemm) computes in bfloat16 only; set dtype bfloat16 or auto.")
        return dtype

    def int4_config(self, group_size: int):
        from torchao.quantization import Int4WeightOnlyConfig

        return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")  # tinygemm

    def check_quantization_on_rank(self, fmt: str, device: str) -> None:
        import torch

        if fmt == "fp8" and torch.cuda.get_device_capability(device) < (8, 9):
            raise ConfigError("quantization", f"fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, "
                              f"Hopper); this one is {torch.cuda.get_device_capability(device)}: use int8 or int4.")

    def graph_capture(self, enforce_eager: bool, world_size: int):
        """CUDA graphs on one device (captured at start-up, replayed per step: whole steps with the triton backend,
        decode steps with sdpa); none with ``enforce_eager`` and for TP > 1 (NCCL all-reduce inside captured
        graphs is unverified here)."""
        if enforce_eager or world_size > 1:
            return None
        import torch

        from raytp.platforms.graphs import DeviceGraphs

        return DeviceGraphs("cuda_graphs", torch.cuda, "CUDAGraph")
