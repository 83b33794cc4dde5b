"""The one place that knows device names, Ray resources, process-group backends and device env vars.

``Accelerator`` answers, for cpu / xpu / cuda: the Ray bundle of one rank, the torch
device of a rank, the torch.distributed backend, the environment a worker needs
before it imports torch's distributed or DeepSpeed, and whether the node has the
devices. Probes of the hardware are plain functions so the choices are unit-tested
without it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass

from raytp.errors import ConfigError


def _torch_has(device: str) -> bool:
    import torch

    mod = getattr(torch, device, None)
    try:
        return bool(mod is not None and mod.is_available())
    except Exception:  # noqa: BLE001 - a broken driver stack means "not available"
        return False


def _xccl_available() -> bool:
    import torch.distributed as dist

    probe = getattr(dist, "is_xccl_available", None)
    return bool(probe and probe())


def _ccl_importable() -> bool:
    return importlib.util.find_spec("oneccl_bindings_for_pytorch") is not None


def torch_extensions_dir() -> str:
    """Where DeepSpeed's just-in-time ops are built: per Python environment unless TORCH_EXTENSIONS_DIR is set.

    torch's default (~/.cache/torch_extensions) is shared by every environment on the machine, so two
    environments with different builds rebuild over each other and wait on each other's build lock."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(sys.prefix, "torch_extensions")


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


def local_accelerator(*, has=_torch_has) -> str:
    """The first of xpu, cuda that torch can use in this process, else cpu."""
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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512_BF16 or AMX). Without it torch emulates bf16 matmuls,
    measured 200x slower than float32 on an AVX2 host."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


@dataclass(frozen=True)
class Accelerator:
    """Hardware facts for one device type. Instances: ``get('cpu' | 'xpu' | 'cuda')``."""

    name: str
    default_dtype: str
    # Ray resource that one rank's bundle asks for besides CPU (Ray counts Intel GPUs as "GPU" too).
    ray_device_resource: str | None
    deepspeed_accelerator: str

    def bundle(self, num_cpus: float) -> dict[str, float]:
        """Resources of one rank's placement-group bundle."""
        b = {"CPU": float(num_cpus)}
        if self.ray_device_resource:
            b[self.ray_device_resource] = 1.0
        return b

    def torch_device(self) -> str:
        """The torch device a rank uses. Ray restricts each rank to its one device (CUDA_VISIBLE_DEVICES /
        ONEAPI_DEVICE_SELECTOR), so it is always index 0."""
        return "cpu" if self.name == "cpu" else f"{self.name}:0"

    def backend(self, *, xccl_available=None, ccl_importable=None) -> str:
        """torch.distributed backend for this device; probes the installed torch unless told."""
        if self.name == "cpu":
            return "gloo"  # DeepSpeed swaps in its shared-memory all-reduce for AutoTP on CPU
        if self.name == "cuda":
            return "nccl"
        return select_xpu_backend(
            _xccl_available() if xccl_available is None else xccl_available,
            _ccl_importable() if ccl_importable is None else ccl_importable,
        )

    def worker_env(self, *, rank: int, world_size: int, master_addr: str, master_port: int,
                   num_threads: int) -> dict[str, str]:
        """Environment a rank sets before importing torch.distributed users (DeepSpeed reads these at import/init)."""
        env = {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            # DeepSpeed's shm all-reduce segfaults without LOCAL_SIZE; a TP group is on one node (STRICT_PACK).
            "LOCAL_SIZE": str(world_size),
            "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port),
            "DS_ACCELERATOR": self.deepspeed_accelerator,
            # Ray sets OMP_NUM_THREADS=1 in actors; give each rank the CPUs of its bundle.
            "OMP_NUM_THREADS": str(num_threads),
            "MKL_NUM_THREADS": str(num_threads),
            "TORCH_EXTENSIONS_DIR": torch_extensions_dir(),
        }
        if self.name == "xpu":
            env.update({
                # Settings from Intel's DeepSpeed AutoTP examples: exchange IPC handles over sockets,
                # no MPI launcher (Ray is the launcher), local rank/size for oneCCL's topology.
                "CCL_ZE_IPC_EXCHANGE": "sockets",
                "CCL_PROCESS_LAUNCHER": "none",
                "CCL_LOCAL_RANK": str(rank),
                "CCL_LOCAL_SIZE": str(world_size),
                "CCL_ATL_TRANSPORT": "ofi",
                "FI_PROVIDER": "tcp",
            })
        return env

    def kv_cache_budget(self, configured: int | None, utilization: float) -> int:
        """Bytes this rank may give its KV cache, asked after the shard is loaded: ``configured`` if set; on cpu
        4 GiB (vLLM's CPU default); on xpu/cuda ``utilization`` of the device's memory minus what torch holds
        now, less a margin of a tenth of the rest for a step's activations."""
        if configured is not None:
            return configured
        if self.name == "cpu":
            return 4 << 30
        import torch

        mod = getattr(torch, self.name)
        total = mod.get_device_properties(self.torch_device()).total_memory
        free = int(total * utilization) - mod.memory_reserved()
        return max(0, int(free * 0.9))

    @staticmethod
    def rank_cpus(rank: int, world_size: int, threads: int, allowed: list[int]) -> list[int]:
        """CPU ranks: the cores rank ``rank`` pins its threads to — its own slice of the node's ``allowed`` cores —
        when the gang's threads fill the node exactly (so no other gang shares it); else [] (left to the OS,
        which cannot know which cores another gang's ranks would pin to). Without it, the OS moves a rank's
        OpenMP threads across cores and the two ranks' threads compete, while each step waits for the slower."""
        if world_size * threads != len(allowed):
            return []
        return allowed[rank * threads:(rank + 1) * threads]

    def decode_mode(self, enforce_eager: bool, world_size: int) -> str | None:
        """How decode steps run (``raytp.gang.static_decode``): 'cuda_graphs' on one CUDA device (captured at
        start-up, replayed per step); None (eager, any shape) with ``enforce_eager``, on CPU (a spike on 2 cores:
        torch.compile of the fixed-shape decode step took ~45 s per bucket to compile and then ran slower than
        eager, docs/performance.md; there is no launch overhead for graphs to remove), on XPU (XPU graphs are
        not generally available in torch; torch.compile on XPU is, but unmeasured here), and for CUDA TP > 1
        (NCCL all-reduce inside captured graphs is unverified here)."""
        if enforce_eager:
            return None
        if self.name == "cuda" and world_size == 1:
            return "cuda_graphs"
        return None

    def check_available(self, *, has=_torch_has) -> None:
        """Run in a rank (the process Ray gave the device to): fail if torch cannot use this device kind here."""
        if self.name == "cpu" or has(self.name):
            return
        hint = "install torch's XPU build and Intel's GPU driver (README 'Intel XPU')" if self.name == "xpu" else \
            "install a CUDA build of torch and the NVIDIA driver"
        raise ConfigError("device", f"{self.name} requested but torch sees no {self.name} device on this rank's "
                          f"node; {hint}, or use device: cpu.")


_ACCELERATORS = {
    "cpu": Accelerator("cpu", "bfloat16", None, "cpu"),  # the default where bf16 is native (config.resolve)
    "xpu": Accelerator("xpu", "float16", "GPU", "xpu"),
    "cuda": Accelerator("cuda", "float16", "GPU", "cuda"),
}


def get(name: str) -> Accelerator:
    try:
        return _ACCELERATORS[name]
    except KeyError:
        raise ConfigError("device", f"unknown device {name!r}; choose auto, cpu, xpu or cuda.") from None
