"""Intel GPUs: torch's native XPU build with ``xccl`` first (oneCCL bindings as a fallback), oneDNN int4."""

from __future__ import annotations

import importlib.util

from raytp.errors import ConfigError
from raytp.platforms.base import Platform


def _xccl_available() -> bool:
    import torch.distributed as dist

    probe = getattr(dist, "is_xccl_available", None)
    return bool(probe and probe())


def _ccl_importable() -> bool:
    return importlib.util.find_spec("oneccl_bindings_for_pytorch") is not None


def select_xpu_backend(xccl_available: bool, ccl_importable: bool) -> str:
    """torch-native ``xccl`` (torch >= 2.8 XPU builds) first, else ``ccl`` from oneccl_bindings_for_pytorch."""
    if xccl_available:
        return "xccl"
    if ccl_importable:
        return "ccl"
    raise ConfigError(
        "device",
        "xpu needs a collective backend: install torch's XPU build (ships 'xccl') or oneccl_bind_pt (provides 'ccl'); "
        "see README 'Intel XPU'.",
    )


class XpuPlatform(Platform):
    name = "xpu"
    deepspeed_accelerator = "xpu"
    install_hint = "install torch's XPU build and Intel's GPU driver (README 'Intel XPU')"

    def backend(self, *, xccl_available=None, ccl_importable=None) -> str:
        return select_xpu_backend(
            _xccl_available() if xccl_available is None else xccl_available,
            _ccl_importable() if ccl_importable is None else ccl_importable,
        )

    def extra_env(self, rank: int, world_size: int) -> dict[str, str]:
        # Settings from Intel's DeepSpeed AutoTP examples: exchange IPC handles over sockets, no MPI launcher
        # (Ray is the launcher), local rank/size for oneCCL's topology.
        return {
            "CCL_ZE_IPC_EXCHANGE": "sockets",
            "CCL_PROCESS_LAUNCHER": "none",
            "CCL_LOCAL_RANK": str(rank),
            "CCL_LOCAL_SIZE": str(world_size),
            "CCL_ATL_TRANSPORT": "ofi",
            "FI_PROVIDER": "tcp",
        }

    def int4_config(self, group_size: int):
        from torchao.quantization import Int4WeightOnlyConfig

        return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="plain_int32")  # oneDNN

    def graph_capture(self, enforce_eager: bool, world_size: int):
        """None (eager): graph capture on XPU (``torch.xpu.XPUGraph`` in recent torch) is unverified here. The
        triton backend's steps already run on fixed shapes; once verified on a device this returns
        ``DeviceGraphs("xpu_graphs", torch.xpu, "XPUGraph")`` and nothing else changes."""
        return None
