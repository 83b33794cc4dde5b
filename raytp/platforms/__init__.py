"""One class per device kind (``cpu``, ``cuda``, ``xpu``): everything that differs between devices, in one place.

``get(name)`` returns the platform; ``local_accelerator`` and ``device_from_cluster`` decide what ``device: auto``
means where the app is built.
"""

from __future__ import annotations

from raytp.errors import ConfigError
from raytp.platforms.base import Platform, torch_extensions_dir, torch_has
from raytp.platforms.cpu import CpuPlatform, cpu_has_native_bf16
from raytp.platforms.cuda import CudaPlatform
from raytp.platforms.xpu import XpuPlatform, select_xpu_backend

PLATFORMS: dict[str, Platform] = {p.name: p for p in (CpuPlatform(), CudaPlatform(), XpuPlatform())}

__all__ = ["PLATFORMS", "Platform", "cpu_has_native_bf16", "device_from_cluster", "get", "local_accelerator",
           "select_xpu_backend", "torch_extensions_dir"]


def get(name: str) -> Platform:
    try:
        return PLATFORMS[name]
    except KeyError:
        raise ConfigError("device", f"unknown device {name!r}; choose auto, cpu, xpu or cuda.") from None


def local_accelerator(*, has=None) -> str:
    """The first of xpu, cuda that torch can use in this process, else cpu."""
    has = has or torch_has
    for device in ("xpu", "cuda"):
        if has(device):
            return device
    return "cpu"


# Ray advertises Intel and NVIDIA GPUs alike as "GPU"; its accelerator_type resource tells them apart
# ("accelerator_type:Intel-GPU-Max-1550", "accelerator_type:H100", ...).
_INTEL_GPU_TYPE_PREFIX = "accelerator_type:Intel-GPU"


def device_from_cluster(resources: dict[str, float]) -> str:
    """The device kind a Ray cluster's advertised resources name (``ray.cluster_resources()``)."""
    if resources.get("GPU", 0) <= 0:
        return "cpu"
    types = [k for k in resources if k.startswith("accelerator_type:")]
    if any(t.startswith(_INTEL_GPU_TYPE_PREFIX) for t in types):
        return "xpu"
    if types:
        return "cuda"
    raise ConfigError("device", "auto: the Ray cluster has GPU resources of no known accelerator_type, so raytp "
                      "cannot tell Intel from NVIDIA GPUs; set device: xpu or device: cuda.")
