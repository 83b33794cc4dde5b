"""Decode attention on a CPU: every decode row of a step in one call over the paged pool — raytp's kernel
(``csrc/paged_decode.cpp``) for bf16 pools on CPUs with AVX-512, else one loop nest that Inductor writes.

Why not torch ops: per row, two float32 einsums over a float32 copy of the row's keys and values (``sdpa.
_decode_one``) spend most of their time making that copy and dispatching small ops; at 16 decode rows of ~200
tokens it was ~40 % of a 0.5B step on one core. A batched einsum over the gathered blocks is slower still (batched
GEMMs of tiny matrices). Inductor, from the few lines of ``paged_decode``, generates the loop vLLM's CPU backend
writes by hand — block tables read inside the loop, bf16 loaded and widened in registers, float32 scores, softmax
and sums, no copy of the context — and serves every dtype and CPU. Why a hand-written kernel beside it: Inductor's
loops split the rows statically among the threads (rows of unequal context leave one waiting), make several passes
over each row's scores, and read the pool at ~8 GB/s; raytp's kernel takes (row, KV head) units from a shared
counter, scores 16 keys at a time for every query head of the group, prefetches the next keys' scattered lines and
reads each key and value once (a 0.5B's 16-row decode step at 100-400 tokens of context: 72-75 ms against 79-89,
docs/performance.md). Row counts, table widths and the pool size are dynamic, head counts and sizes static: the
Inductor version compiles two graphs (one row, more) that serve every step; ``warm_up`` compiles them at start-up
with realistic sizes (Inductor's loop choices follow the first sizes it sees); ``recompiles`` counts graphs compiled
later, which tests forbid.

Numbers: a row's result does not depend on the other rows of the step nor on how far its table is padded (padded
keys are masked to exactly zero weight; both versions keep a key's place in the reduction whatever the width, and
the kernel computes a row's head on one thread), so the same request decodes to the same bits in any batch
(tested: ``tests/unit/test_sdpa_decode.py``, ``tests/unit/test_cpu_decode_kernel.py``).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import time
import types

import torch

from raytp.gang import cpu_kernels

logger = logging.getLogger(__name__)


def paged_decode(q: torch.Tensor, key_blocks: torch.Tensor, value_blocks: torch.Tensor, tables: torch.Tensor,
                 lens: torch.Tensor) -> torch.Tensor:
    """One query per row, q [B, Hq, D] float32 and already scaled, over the first ``lens[b]`` slots of the blocks
    ``tables[b]`` (a [B, W] table padded with any block, masked) of ``key_blocks`` / ``value_blocks`` [N,
    block_size, Hkv, D] → [B, Hq, D] float32, computed in float32. (The scale is applied by the caller so that no
    float reaches the compiler, which would specialise on it.) Eager, this materialises [B, L, Hkv, group, D]: it
    is written to be compiled (``PagedDecode``)."""
    b, w = tables.shape
    _, bs, hkv, d = key_blocks.shape
    keys = key_blocks[tables].view(b, w * bs, hkv, d).float()  # in a compiled loop: indexed loads, no copy
    values = value_blocks[tables].view(b, w * bs, hkv, d).float()
    scores = (q.view(b, 1, hkv, -1, d) * keys[:, :, :, None, :]).sum(-1)  # [B, L, Hkv, group]
    past = torch.arange(w * bs, device=q.device)[None, :] >= lens[:, None]
    scores = scores.masked_fill(past[:, :, None, None], float("-inf"))
    weights = torch.softmax(scores, 1)
    # slots past a row's context may hold anything (a block's unwritten tail): a zero weight times NaN is NaN
    values = values.masked_fill(past[:, :, None, None], 0.0)
    out = (weights[..., None] * values[:, :, :, None, :]).sum(1)  # [B, Hkv, group, D]
    return out.reshape(q.shape)


_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = (("raytp_paged_decode_bf16", (_P, _P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64,
                                            ctypes.c_float, ctypes.c_int)),)


def _library() -> ctypes.CDLL:
    return cpu_kernels.library("paged_decode", _SIGNATURES)


def native_supported(pool: torch.Tensor) -> bool:
    """raytp's decode kernel (``csrc/paged_decode.cpp``) can attend over the layer pool ``pool`` ([slots, Hkv, D]
    or [N, block_size, Hkv, D]) here: bf16 on the CPU, D a multiple of 16, a CPU with AVX-512 and the library
    built. Decided once per backend, before any tracing."""
    return (pool.device.type == "cpu" and pool.dtype == torch.bfloat16 and pool.shape[-1] % 16 == 0
            and native_available())


@functools.cache
def native_available() -> bool:
    """This CPU runs raytp's decode kernel and its library builds (else a warning, once: Inductor's loops attend)."""
    reason = None
    if not getattr(torch.cpu, "_is_avx512_supported", lambda: False)():
        reason = "the CPU has no AVX-512"
    else:
        try:
            _library()
        except Exception as exc:  # noqa: BLE001 - a compiler missing or failing is a fallback, not a crash
            reason = f"building it failed: {exc}"
    if reason is not None:
        logger.warning("raytp's CPU decode attention kernel unavailable (%s); Inductor's loops attend instead", reason)
    return reason is None


def build() -> str:
    """Build (or find) the kernel's library now; its path."""
    return _library()._name


def native_decode(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, keys: torch.Tensor,
                  values: torch.Tensor, slots: torch.Tensor | None, tables: torch.Tensor, lens: torch.Tensor,
                  scale: float, block_size: int) -> torch.Tensor:
    """``torch.ops.raytp.cpu_paged_decode``, raytp's kernel: ``paged_decode`` of ``q`` [B, Hq, D] (bf16) scaled by
    ``scale`` over the layer pool ``keys`` / ``values`` [N * block_size, Hkv, D] (bf16) → [B, Hq, D] bf16; first,
    with ``k`` / ``v`` [B, Hkv, D] given, writes them into the rows' ``slots``. That write is a side effect the
    compiler is not told of (declaring the pool mutated would make a functional graph copy it): safe as for
    ``raytp::paged_attention``, since nothing else in a step's graph reads the layer's pool and the op's output is
    always used."""
    b, hq, d = q.shape
    # the kernel trusts its pointers: a wrong dtype or shape would read past the tensors, not fail
    if (q.dtype != torch.bfloat16 or keys.dtype != torch.bfloat16 or hq % keys.shape[-2] or d != keys.shape[-1]
            or d % 16):
        raise ValueError(f"raytp's CPU decode kernel takes bf16 q [B, Hq, D] over a bf16 pool [slots, Hkv, D] with "
                         f"Hkv dividing Hq and D a multiple of 16; got q {q.dtype} {tuple(q.shape)}, pool "
                         f"{keys.dtype} {tuple(keys.shape)}")
    q = q.contiguous()
    tables, lens = tables.to(torch.int32).contiguous(), lens.to(torch.int32).contiguous()
    if k is not None:
        k, v = k.to(keys.dtype).contiguous(), v.to(values.dtype).contiguous()
        slots = slots.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    if b:
        _library().raytp_paged_decode_bf16(
            q.data_ptr(), None if k is None else k.data_ptr(), None if v is None else v.data_ptr(), keys.data_ptr(),
            values.data_ptr(), None if k is None else slots.data_ptr(), tables.data_ptr(), lens.data_ptr(),
            out.data_ptr(), b, hq, keys.shape[-2], d, tables.shape[1], block_size, scale, torch.get_num_threads())
    return out


# registered as a plain CPU kernel, not through ``torch.library.custom_op``, whose wrapper costs ~3 us more per call
# (measured, a 1-row call: 19.4 us this way, 22.5 as a custom_op, 4.4-6.6 for the kernel alone; one call per layer
# of every decode step)
_lib = torch.library.Library("raytp", "FRAGMENT")
_lib.define("cpu_paged_decode(Tensor q, Tensor? k, Tensor? v, Tensor keys, Tensor values, Tensor? slots, "
            "Tensor tables, Tensor lens, float scale, int block_size) -> Tensor")
_lib.impl("cpu_paged_decode", native_decode, "CPU")


@torch.library.register_fake("raytp::cpu_paged_decode")
def _(q, k, v, keys, values, slots, tables, lens, scale, block_size):
    return torch.empty_like(q)


def write_and_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     slots: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, scale: float,
                     block_size: int, native: bool = False) -> torch.Tensor:
    """A decode-only step's attention for one layer, written to be traced into the compiled step
    (``AttentionBackend.graph_decode``): the rows' keys / values [B, Hkv, D] into their ``slots`` of the layer's pool
    ``keys`` / ``values`` [N * block_size, Hkv, D], then ``paged_decode`` of ``q`` [B, Hq, D] → [B, Hq, D] in q's
    dtype. The same loop nest as ``PagedDecode`` (a row's numbers depend on nothing else in the step), inside the
    step's graph: no call per layer, no guards. ``native``: raytp's kernel does both (``native_decode``), as
    ``PagedDecode`` attends with it eagerly over such a pool."""
    if native:
        return torch.ops.raytp.cpu_paged_decode(q.to(keys.dtype), k, v, keys, values, slots, tables, lens, scale,
                                                block_size).to(q.dtype)
    keys.index_copy_(0, slots, k.to(keys.dtype))
    values.index_copy_(0, slots, v.to(values.dtype))
    shape = (keys.shape[0] // block_size, block_size, *keys.shape[1:])
    return paged_decode(q.float() * scale, keys.view(shape), values.view(shape), tables, lens).to(q.dtype)


class PagedDecode:
    """``paged_decode`` compiled with dynamic row counts and table widths, once per configuration (dtype, pool
    block shape, query heads: a rank has one, a test process many); one per process (``shared``: every backend of
    a process reuses its graphs). ``warm_up`` compiles a configuration and raises what Inductor raises where it
    cannot build (no C++ compiler): the caller falls back to per-row attention. ``recompiles``: graphs compiled
    outside a warm-up, i.e. in a step (tests forbid them)."""

    @classmethod
    @functools.cache
    def shared(cls) -> PagedDecode:
        return cls()

    def __init__(self):
        self.recompiles = 0
        self._warming = False
        self._fns: dict[tuple, object] = {}  # configuration -> its compiled function

    @staticmethod
    def _key(key_blocks: torch.Tensor, heads: int) -> tuple:
        return key_blocks.dtype, tuple(key_blocks.shape[1:]), heads

    def _compile(self, graph_module, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        if not self._warming:
            self.recompiles += 1
            logger.warning("CPU decode attention recompiled in a step (%d so far)", self.recompiles)
        return compile_fx(graph_module, example_inputs)

    def _new_fn(self):
        """A compiled copy of ``paged_decode`` with a code object of its own: Dynamo keeps graphs (and counts them
        against its recompile limit of 8) per code object, and a configuration takes two. Static head counts and
        dims (a symbolic head dim keeps the inner loops from vectorizing: 3.5x slower)."""
        code = paged_decode.__code__.replace(co_name=f"paged_decode_{len(self._fns)}")
        fn = types.FunctionType(code, paged_decode.__globals__, code.co_name)
        return torch.compile(fn, backend=self._compile, dynamic=False, fullgraph=True)

    def __call__(self, q, key_blocks, value_blocks, tables, lens, scale: float) -> torch.Tensor:
        """``paged_decode`` of ``q`` [B, Hq, D] (any float dtype) scaled by ``scale`` → [B, Hq, D] in q's dtype
        (raytp's kernel where ``native_supported``)."""
        if native_supported(key_blocks):
            flat = (-1, *key_blocks.shape[2:])
            return native_decode(q.to(key_blocks.dtype), None, None, key_blocks.view(flat), value_blocks.view(flat),
                                 None, tables, lens, scale, key_blocks.shape[1]).to(q.dtype)
        key = self._key(key_blocks, q.shape[1])
        fn = self._fns.get(key)
        if fn is None:
            fn = self._fns[key] = self._new_fn()
        if tables.shape[1] == 1:  # one graph fewer to compile: a table of one block, padded (masked, same bits)
            tables = torch.nn.functional.pad(tables, (0, 1))
        qf = q.float() * scale
        for t in (qf, tables, lens, key_blocks, value_blocks):  # rows; blocks in the pool
            torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.maybe_mark_dynamic(tables, 1)  # table width
        return fn(qf, key_blocks, value_blocks, tables, lens).to(q.dtype)

    def ready(self, key_blocks: torch.Tensor, heads: int) -> bool:
        return native_supported(key_blocks) or self._key(key_blocks, heads) in self._fns

    def warm_up(self, key_blocks: torch.Tensor, value_blocks: torch.Tensor, heads: int) -> float:
        """Compile both shape classes a step of this pool with ``heads`` query heads can have — one row, more
        (the compiler specialises sizes 0 and 1; tables are at least two blocks wide) — over the null block 0 (its
        contents are masked), with realistic sizes; returns the seconds (0 with raytp's kernel: nothing to compile)."""
        if native_supported(key_blocks):
            return 0.0
        start = time.perf_counter()
        device, d = key_blocks.device, key_blocks.shape[-1]
        self._warming = True
        try:
            with torch.inference_mode():  # as steps run: inference tensors
                for rows in (1, 16):
                    q = torch.zeros((rows, heads, d), dtype=key_blocks.dtype, device=device)
                    tables = torch.zeros((rows, 16), dtype=torch.int32, device=device)
                    lens = torch.ones(rows, dtype=torch.int32, device=device)
                    self(q, key_blocks, value_blocks, tables, lens, 1.0)
        except BaseException:
            self._fns.pop(self._key(key_blocks, heads), None)
            raise
        finally:
            self._warming = False
        seconds = time.perf_counter() - start
        logger.info("CPU decode attention compiled in %.1f s", seconds)
        return seconds
