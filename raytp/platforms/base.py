"""What every device kind answers (``Platform``); one subclass per kind in this package (vLLM's ``platforms/``).

Everything that differs between cpu, cuda and xpu is a method or a class attribute here, overridden in that
device's file: the Ray bundle, torch device and process-group backend, the environment a rank needs, the dtype
rules, which torchao formats have kernels and how int4 is packed, the KV budget, how decode steps run (graphs or
eager), which attention backend ``auto`` means. Adding a device is one new file and one line in
``raytp.platforms.PLATFORMS``. Probes of the hardware are injectable so the choices are unit-tested without it.
"""

from __future__ import annotations

import os
import sys

from raytp.errors import ConfigError


def torch_has(device: str) -> bool:
    import torch

    mod = getattr(torch, device, None)
    try:
        return bool(mod is not None and mod.is_available())
    except Exception:  # noqa: BLE001 - a broken driver stack means "not available"
        return False


def torch_extensions_dir() -> str:
    """Where DeepSpeed's just-in-time ops are built: per Python environment unless TORCH_EXTENSIONS_DIR is set.

    torch's default (~/.cache/torch_extensions) is shared by every environment on the machine, so two
    environments with different builds rebuild over each other and wait on each other's build lock."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(sys.prefix, "torch_extensions")


def inductor_cache_dir() -> str:
    """Where Inductor keeps compiled graphs: TORCHINDUCTOR_CACHE_DIR, else under raytp's cache (not /tmp, which a
    reboot empties). A TORCHINDUCTOR_CACHE_DIR naming Inductor's own default counts as unset: Inductor writes that
    variable into the environment the first time it looks for its cache (saving a model does), Ray's workers inherit
    it from whichever process started Ray, and a rank would then cache in /tmp on one start and here on the next —
    a restart that finds nothing (seen: 309 s to compile instead of ~117 s)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from raytp.tiny_model import cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return chosen
    return os.path.join(cache_dir(), "inductor")


class Platform:
    """One device kind. Instances: ``raytp.platforms.get('cpu' | 'xpu' | 'cuda')``."""

    name: str = ""
    default_dtype: str = "float16"  # what dtype 'auto' means on accelerators (the CPU decides per host: CpuPlatform)
    ray_device_resource: str | None = "GPU"  # Ray counts Intel and NVIDIA GPUs alike as "GPU"
    deepspeed_accelerator: str = ""
    quantizations: tuple[str, ...] = ("int4", "int8")  # torchao formats with kernels on this device kind
    # scheduling defaults when the config leaves them null: vLLM's API-server defaults for GPUs
    default_max_num_seqs = 256
    default_max_num_batched_tokens = 2048

    # ---- placement and process group (where the app is built, and on each rank) --------------------------------
    def bundle(self, num_cpus: float) -> dict[str, float]:
        """Resources of one rank's placement-group bundle."""
        b = {"CPU": float(num_cpus)}
        if self.ray_device_resource:
            b[self.ray_device_resource] = 1.0
        return b

    def torch_device(self) -> str:
        """The torch device a rank uses. Ray restricts each rank to its one device (CUDA_VISIBLE_DEVICES /
        ONEAPI_DEVICE_SELECTOR), so it is always index 0."""
        return f"{self.name}:0"

    def backend(self, **probes) -> str:
        """torch.distributed backend for this device kind."""
        raise NotImplementedError

    def worker_env(self, *, rank: int, world_size: int, master_addr: str, master_port: int,
                   num_threads: int) -> dict[str, str]:
        """Environment a rank sets before importing torch.distributed users (DeepSpeed reads these at import/init)."""
        return {
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
            # compiled model steps (raytp.gang.compiled) reuse Inductor's artefacts across restarts
            "TORCHINDUCTOR_CACHE_DIR": inductor_cache_dir(),
            **self.extra_env(rank, world_size),
        }

    def extra_env(self, rank: int, world_size: int) -> dict[str, str]:
        return {}

    def check_available(self, *, has=torch_has) -> None:
        """Run in a rank (the process Ray gave the device to): fail if torch cannot use this device kind here."""
        if not has(self.name):
            raise ConfigError("device", f"{self.name} requested but torch sees no {self.name} device on this rank's "
                              f"node; {self.install_hint}, or use device: cpu.")

    install_hint = ""

    def init_rank(self, rank: int, world_size: int, threads: int) -> None:
        """On the rank, after its environment is set: bind the process to its device (and threads)."""
        import torch

        torch.set_num_threads(threads)
        getattr(torch, self.name).set_device(self.torch_device())

    # ---- dtypes and weight formats (config validation, then the rank's loader) ---------------------------------
    def check_dtype(self, dtype: str) -> None:
        """``ConfigError`` for a dtype this device kind cannot run (checked where the app is built, too)."""

    def resolve_dtype(self, requested: str, native_bf16=None) -> str:
        """On the node: what ``requested`` (a dtype name or 'auto') means here."""
        self.check_dtype(requested)
        return self.default_dtype if requested == "auto" else requested

    def check_quantization(self, fmt: str | None) -> None:
        """``ConfigError`` for a torchao format this device kind has no kernel for."""
        if fmt is not None and fmt not in self.quantizations:
            raise ConfigError("quantization", f"{fmt} has no torchao kernel on {self.name} (fp8 matmuls need a CUDA "
                              "GPU of compute capability >= 8.9); use int4 or int8.")

    def quantized_dtype(self, fmt: str | None, requested: str, dtype: str) -> str:
        """The compute dtype with torchao ``fmt``, given the ``requested`` one and what it resolved to."""
        return dtype

    def int4_config(self, group_size: int):
        """torchao's int4 weight-only config, packed by this device's own kernel."""
        raise NotImplementedError

    def check_quantization_on_rank(self, fmt: str, device: str) -> None:
        """Checks only the rank's device can answer (e.g. a GPU's compute capability)."""

    # ---- memory and step machinery (on the rank) ------------------------------------------------------------
    def kv_cache_budget(self, configured: int | None, utilization: float) -> int:
        """Bytes this rank may give its KV cache, asked after the shard is loaded: ``configured`` if set, else
        ``utilization`` of the device's memory minus what torch holds now, less a margin of a tenth of the rest
        for a step's activations."""
        if configured is not None:
            return configured
        import torch

        mod = getattr(torch, self.name)
        total = mod.get_device_properties(self.torch_device()).total_memory
        free = int(total * utilization) - mod.memory_reserved()
        return max(0, int(free * 0.9))

    def graph_capture(self, enforce_eager: bool, world_size: int):
        """How steps are captured as graphs and replayed on this device (a ``raytp.platforms.graphs.DeviceGraphs``;
        the graph runner, ``raytp.gang.graph_runner``, asks for it once at start-up); None: every step eager."""
        return None

    compile_by_default = False  # compile the model step when the config's compile_model is null
    inductor_options: dict = {}

    def compile_options(self, enforce_eager: bool, requested: bool | None) -> dict | None:
        """Inductor options for the compiled model step (``raytp.gang.compiled``), or None: eager.
        ``requested``: the config's ``compile_model`` (null: this platform's default); ``enforce_eager`` wins."""
        if enforce_eager or not (self.compile_by_default if requested is None else requested):
            return None
        return dict(self.inductor_options)

    def attention_backend(self, requested: str, *, triton_importable=None) -> str:
        """The attention backend ``requested`` (auto | sdpa | triton) means on this rank
        (``raytp.gang.attention``): auto is triton where it compiles for this device and is installed."""
        has_triton = triton_importable_here() if triton_importable is None else triton_importable
        if requested == "auto":
            return "triton" if self.triton_compiles and has_triton else "sdpa"
        if requested == "triton":
            if not has_triton:
                raise ConfigError("attention_backend", "triton is not installed on this rank's node; "
                                  "`pip install 'raytp[kernels]'` or use attention_backend: sdpa.")
            if not self.triton_compiles and os.environ.get("TRITON_INTERPRET") != "1":
                raise ConfigError("attention_backend", f"Triton has no {self.name} backend (TRITON_INTERPRET=1 runs "
                                  "its kernels in the interpreter, for tests only); use sdpa or auto.")
        return requested

    triton_compiles = True  # Triton compiles kernels for this device kind

    @property
    def batch_decode(self) -> bool:
        """sdpa backend: every decode row in one batched call (one launch beats one per row on a GPU)."""
        return True

    @property
    def decode_kernel(self) -> bool:
        """sdpa backend: decode rows through the compiled CPU loop (``attention.cpu_decode``) rather than SDPA."""
        return False

    @property
    def tiled_prefill(self) -> bool:
        """sdpa backend: prompt rows in fixed tiles (``attention.sdpa._prefill_tiles``) rather than the device's
        SDPA kernel: a tile loop costs launches on a GPU, so there torch's flash kernels keep the prompt rows."""
        return False


def triton_importable_here() -> bool:
    """Triton is installed in this environment (not imported: that is slow, and the ranks import it if used)."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None
