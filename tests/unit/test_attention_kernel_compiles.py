"""The Triton paged-attention kernels compile for an H100/H200 here, without a GPU.

The interpreter tests (test_attention_backends.py) check the kernel's arithmetic, but the interpreter runs no GPU
lowering: it upcasts bf16 before every dot and has no layouts, shared memory or tensor cores. Triton's NVIDIA
backend (its wheel brings ptxas) compiles for a named target with no device present, so every launch configuration
raytp uses (``launch_config``'s tiles, warps and stages; segments or none; each dtype) is built here for sm_90 down
to a cubin, specialised as a launch is: a kernel that Triton cannot lower, that asks for more shared memory than one
block of an H100 may have, that spills registers (its stack frame, read by ``cuobjdump``) or whose K/V tiles are no
longer pipelined (``cp.async``), fails in CI instead of on a lent GPU. The GPU session runs this file too, with the
image's Triton.

The compiling runs in a child process: where there is no GPU the tests' conftest turns Triton's interpreter on,
and ``triton.jit`` decides at definition, for Triton's own helpers too, whether a function is interpreted.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SM90_SHARED_BYTES = 232448  # the most shared memory one block may opt in to on sm_90 (227 KiB)
INT32_POINTERS = {"query_start_loc_ptr", "seq_lens_ptr", "block_tables_ptr"}
FP32_POINTERS = {"part_acc_ptr", "part_m_ptr", "part_l_ptr"}
ALIGNED_STRIDES = {"stride_q_tok", "stride_q_head", "stride_o_tok", "stride_o_head", "stride_cache_slot",
                   "stride_cache_head"}

# (dtype, query heads per kv head, head dim, segments): an 8B Llama's decode (GQA 4, D 128) single pass and split,
# in each dtype; the most segments (32); MHA at D 64 (16 query tokens a tile); D 256 (8 warps)
CASES = [("bf16", 4, 128, 1), ("bf16", 4, 128, 8), ("fp16", 4, 128, 8), ("fp32", 4, 128, 1),
         ("bf16", 8, 128, 32), ("bf16", 1, 64, 1), ("fp32", 1, 64, 1), ("bf16", 2, 256, 4), ("fp16", 8, 256, 1),
         ("fp32", 2, 256, 1)]


def compile_for_sm90(kernel, dtype: str, constexprs: dict, num_warps: int, num_stages: int):
    """``kernel`` compiled for sm_90: pointers by name (the step's tensors in ``dtype``, metadata int32, segment
    partials fp32), ``scale`` fp32, every other runtime argument int32, specialised as a launch here would be."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in INT32_POINTERS:
            signature[name] = "*i32"
        elif name in FP32_POINTERS:
            signature[name] = "*fp32"
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype}"
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    # what Triton's launcher specialises at run time, as its AOT tool writes it: the tensors (the caching
    # allocator's blocks) and the q / out / cache strides (head dims and head counts times them) divisible by 16
    names = list(signature)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
             if signature[name].startswith("*") or name in ALIGNED_STRIDES}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def resource_usage(cubin: bytes) -> dict | None:
    """Registers and stack of the cubin's kernel, as ``cuobjdump -res-usage`` reads them (a stack frame is where
    ptxas spills registers); None without a cuobjdump (Triton's wheel brings one, as it brings ptxas)."""
    import re
    import shutil
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return {"registers": int(usage.group(1)), "stack": int(usage.group(2))}


def compile_case(dtype: str, queries_per_kv: int, head_dim: int, segments: int) -> dict:
    """What the kernels of one case compiled to (run in the child, interpreter off)."""
    import torch

    from raytp.gang.attention import triton_kernel as tk

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    _, _, tile_n, num_warps, num_stages = tk.launch_config(queries_per_kv, head_dim, torch_dtype)
    attention_constants, merge_constants = tk.kernel_constants(8 * queries_per_kv, 8, head_dim, torch_dtype,
                                                               block_size=16, tile_n=tile_n, num_segments=segments)
    attention = compile_for_sm90(tk._paged_attention_kernel, dtype, attention_constants, num_warps, num_stages)
    result = {"cubin_bytes": len(attention.asm["cubin"]), "shared": attention.metadata.shared,
              "mma": "mma" in attention.asm["ptx"], "cp_async": "cp.async" in attention.asm["ptx"],
              "merge_cubin_bytes": None,
              "resources": resource_usage(attention.asm["cubin"])}
    if segments > 1:
        merge = compile_for_sm90(tk._merge_segments_kernel, dtype, merge_constants, **tk.MERGE_OPTIONS)
        result["merge_cubin_bytes"] = len(merge.asm["cubin"])
    return result


def main() -> None:
    """The child: one JSON object, each case's result or its error (so one case failing fails only its test)."""
    from triton.backends import backends

    if "nvidia" not in backends:
        print(json.dumps({"skip": "this Triton has no NVIDIA backend"}))
        return
    results = {}
    for case in CASES:
        try:
            results[repr(case)] = compile_case(*case)
        except Exception as e:  # noqa: BLE001 - reported to the case's test, which fails on it
            results[repr(case)] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(results))


@pytest.fixture(scope="module")
def compiled() -> dict:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    child = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, f"the compiling process failed:\n{child.stderr[-4000:]}"
    results = json.loads(child.stdout.strip().splitlines()[-1])
    if "skip" in results:
        pytest.skip(results["skip"])
    return results


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_the_kernels_compile_for_sm90(compiled, case):
    result = compiled[repr(case)]
    assert "error" not in result, result.get("error")
    assert result["cubin_bytes"] > 0, "no machine code"
    assert result["shared"] <= SM90_SHARED_BYTES, f"{result['shared']} bytes of shared memory"
    # 16-bit dots run on tensor cores; float32 ones are exact FMAs (input_precision="ieee", not tf32)
    assert result["mma"] == (case[0] != "fp32")
    assert result["cp_async"], "K/V tiles are not brought in asynchronously (no software pipelining)"
    if result["resources"] is not None:  # no spills: registers are all the kernel keeps its tiles in
        assert result["resources"]["stack"] == 0, f"spills registers: {result['resources']}"
    if case[3] > 1:
        assert result["merge_cubin_bytes"], "the merge kernel made no machine code"


if __name__ == "__main__":
    main()
