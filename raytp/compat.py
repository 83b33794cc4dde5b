"""The few places where transformers 4.4x (ipex-llm's pin) and transformers 5 differ.

(The attention hook differs too: an attention-interface function on 5.x, a ``Cache.update`` shim on 4.x;
that lives with the paged attention, ``raytp.gang.attention.hf``.)
"""

from __future__ import annotations

import transformers
from packaging.version import Version

TRANSFORMERS_5 = Version(transformers.__version__) >= Version("5.0.0")


def dtype_kwarg(dtype) -> dict:
    """transformers 5 takes ``dtype=``; 4.x takes ``torch_dtype=``."""
    return {"dtype": dtype} if TRANSFORMERS_5 else {"torch_dtype": dtype}
