"""raytp's hand-written CPU kernels (``csrc/*.cpp``), each a small library of plain C functions built just in time
by torch's ``cpp_extension`` into ``TORCH_EXTENSIONS_DIR`` (``raytp build-ops`` builds them ahead) and called
through ctypes, which releases the GIL: no torch headers, so a build takes about a second. OpenMP comes from the
process's runtime (torch's libgomp, already loaded). Why each exists: the module that calls it
(``raytp.gang.cpu_linear``, ``raytp.gang.attention.cpu_decode``)."""

from __future__ import annotations

import ctypes
import functools
import os

_CSRC = os.path.join(os.path.dirname(__file__), "csrc")


@functools.cache
def library(stem: str, signatures: tuple[tuple[str, tuple], ...]) -> ctypes.CDLL:
    """``csrc/{stem}.cpp`` built (or found) and loaded, its functions typed by ``signatures`` ((name, argtypes),
    all returning void). Raises what the build raises (no compiler, a failed build)."""
    from torch.utils.cpp_extension import load

    path = load(f"raytp_{stem}", [os.path.join(_CSRC, f"{stem}.cpp")],
                extra_cflags=["-O3", "-fopenmp", "-std=c++17"], extra_ldflags=["-fopenmp"], is_python_module=False)
    lib = ctypes.CDLL(path)
    for name, argtypes in signatures:
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = list(argtypes), None
    return lib
