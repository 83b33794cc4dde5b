"""raytp's CPU bf16 linear (``csrc/bf16_linear.cpp``): weights packed once into its own layout, products by an
AVX-512 BF16 kernel for every row count.

Why by hand: at decode sizes (1-16 rows) oneDNN's bf16 matmul reads a prepacked weight at about half of what the
memory delivers on a CPU without AMX (its one-row kernel bounds the step: docs/performance.md), and neither torch,
Inductor nor oneDNN offers a faster one. This kernel streams one 64-byte line per 16 outputs per ``vdpbf16ps``;
measured on the 0.5B's shapes (``benchmarks/cpu_linear.py``) it reads weights 1.3-2x faster than oneDNN at 1-8
rows and matches it on prompt chunks, from one copy of the weights. It also computes a row the same way whatever
else the batch holds (one fp32 lane per output, k ascending): greedy answers do not depend on batching.

Where it is used (``kernel_for``): bf16 on CPUs with AVX512_BF16 and without AMX (with AMX oneDNN's tile kernels
compute prompts several times faster than any AVX-512 kernel; not measurable here). The library is built just in
time as raytp's other CPU kernels are (``raytp.gang.cpu_kernels``).
"""

from __future__ import annotations

import ctypes
import logging

import torch

from raytp.errors import ConfigError
from raytp.gang import cpu_kernels

logger = logging.getLogger(__name__)

def unsupported_reason() -> str | None:
    """Why this CPU cannot run the kernel, or None if it can (a node fact: ask on the rank's node)."""
    if not _cpu_has("_is_avx512_bf16_supported"):
        return "the CPU has no AVX512_BF16"
    return None


def _cpu_has(check: str) -> bool:
    """torch's CPU feature check ``check`` (private helpers of ``torch.cpu``; False where this torch lacks one)."""
    return bool(getattr(torch.cpu, check, lambda: False)())


def kernel_for(dtype: torch.dtype, requested: str) -> str:
    """Which kernel a rank's packed linears use: ``'raytp'`` or ``'onednn'``, for ``requested`` (the config's
    ``cpu_linear_kernel``: auto / raytp / onednn) on this CPU. ``ConfigError`` if ``'raytp'`` was asked for and
    cannot run here; ``auto`` falls back to oneDNN with a log line."""
    if requested == "onednn" or dtype != torch.bfloat16:
        if requested == "raytp" and dtype != torch.bfloat16:
            raise ConfigError("cpu_linear_kernel", f"'raytp' computes bfloat16 only, not {dtype}")
        return "onednn"
    if requested == "auto" and _cpu_has("_is_amx_tile_supported"):
        return "onednn"
    reason = unsupported_reason()
    if reason is None:
        try:
            _library()
        except Exception as exc:  # noqa: BLE001 - a compiler missing or failing is a fallback, not a crash
            reason = f"building it failed: {exc}"
    if reason is None:
        return "raytp"
    if requested == "raytp":
        raise ConfigError("cpu_linear_kernel", f"'raytp' cannot run on this node: {reason}")
    logger.warning("raytp's CPU linear unavailable (%s); using oneDNN's", reason)
    return "onednn"


_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = (("raytp_pack_bf16", (_P, _P, _I64, _I64)),
               ("raytp_linear_bf16", (_P, _I64, _P, _P, _P, _I64, _I64, _I64, ctypes.c_int)))


def _library() -> ctypes.CDLL:
    return cpu_kernels.library("bf16_linear", _SIGNATURES)


def build() -> str:
    """Build (or find) the library now; its path."""
    return _library()._name


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [N, K] (bf16, K even) in the kernel's layout: a new 1-D tensor, the original untouched."""
    n, k = weight.shape
    if weight.dtype != torch.bfloat16 or k % 2:
        raise ValueError(f"raytp's CPU linear packs bf16 weights of even width, not {weight.dtype} "
                         f"{tuple(weight.shape)}")
    weight = weight.contiguous()
    out = torch.empty(((n + 15) // 16) * k * 16, dtype=torch.bfloat16)
    _library().raytp_pack_bf16(weight.data_ptr(), out.data_ptr(), n, k)
    return out


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] (bf16) times the weight ``pack`` returned (+ ``bias``, bf16) → [M, out_features] bf16."""
    m, k = x.shape
    # the kernel trusts its pointers: a wrong width or dtype would read past the weight, not fail
    if x.dtype != torch.bfloat16 or packed.numel() != (out_features + 15) // 16 * 16 * k:
        raise ValueError(f"x {x.dtype} [{m}, {k}] does not fit a packed bf16 weight of {packed.numel()} elements "
                         f"for {out_features} outputs")
    if x.stride(1) != 1:
        x = x.contiguous()
    out = x.new_empty((m, out_features))
    if m:
        _library().raytp_linear_bf16(x.data_ptr(), x.stride(0), packed.data_ptr(),
                                     None if bias is None else bias.data_ptr(), out.data_ptr(), m, out_features, k,
                                     torch.get_num_threads())
    return out
