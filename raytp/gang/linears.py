"""What a rank's linears become after loading: plain ``nn.Linear``s over DeepSpeed's AutoTP shards, and on CPU
linears over prepacked weights (oneDNN's, or raytp's bf16 kernel: ``cpu_linear_kernel``).

DeepSpeed's AutoTP layers compute ``matmul(x, weight.T)`` themselves, which neither torchao's weight tensors nor a
prepacked weight implement; so each becomes a module whose *local* product is a plain ``nn.Linear``
(``plain_linears``), which torchao then quantizes (``raytp.gang.loader.quantize_shard``) or ``prepack_linears``
replaces by a ``PackedLinear`` — the all-reduce of a row-parallel layer stays outside that local product.

Why prepacking: at decode sizes (a few rows) a bf16 ``F.linear`` on CPU reads its weight at about a quarter of the
machine's bandwidth; oneDNN's matmul over a weight reordered once into its blocked layout (the op Inductor's
freezing pass emits, ``torch.ops.mkldnn._linear_pointwise``; vLLM's CPU backend does the same through its own
oneDNN handle) streams it several times faster (``benchmarks/model_step.py`` and docs/performance.md measure
it), and raytp's own bf16 kernel (``raytp.gang.cpu_linear``, the default on CPUs with AVX512_BF16 and no AMX)
1.3-2x faster still at 1-8 rows. The products agree with ``F.linear`` within rounding (fp32 accumulation in both),
not bit for bit: oneDNN's path for a single row (M = 1) rounds differently from the same row in a longer matrix
(any M >= 2 gives a row the same bits, measured for float32 and bf16 at 1 and 2 threads), which the prefix cache
and the scheduler allow for (neither leaves a one-token piece of a prompt); with ``batch_invariant`` a one-row
product is computed as two rows. raytp's kernel computes a row alike in any batch.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from raytp.gang import cpu_linear


class RowParallelLinear(torch.nn.Module):
    """A DeepSpeed ``LinearAllreduce``: this rank's input slice times its weight shard (``local``, an ``nn.Linear``
    or what replaced it), all-reduced over the group, then the (replicated) bias — DeepSpeed's own order."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group):
        super().__init__()
        self.local = _linear(weight, None)
        self.row_bias = bias
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from deepspeed import comm

        out = self.local(x)
        comm.inference_all_reduce(out, group=self.group)
        return out if self.row_bias is None else out + self.row_bias


class ShardedHead(RowParallelLinear):
    """DeepSpeed's sharded LM head (``LmHeadLinearAllreduce``): this rank's slice of the hidden features times its
    weight shard, all-reduced."""

    def __init__(self, head, group):
        super().__init__(head.weight, head.bias, group)
        sizes = head._partition_sizes
        self.offset, self.size = sum(sizes[:head.tp_index]), sizes[head.tp_index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x[..., self.offset:self.offset + self.size])


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    """An ``nn.Linear`` over these tensors (no copy)."""
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    new.weight = torch.nn.Parameter(weight.data, requires_grad=False)
    if bias is not None:
        new.bias = torch.nn.Parameter(bias.data, requires_grad=False)
    return new


def plain_linears(model: torch.nn.Module, head: bool = False) -> None:
    """Replace DeepSpeed's AutoTP linears by modules whose local products are ``nn.Linear``s over the same shards
    (the sharded LM head too with ``head``)."""
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer, LmHeadLinearAllreduce

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LmHeadLinearAllreduce):
                if head:
                    setattr(parent, name, ShardedHead(child, child.mp_group))
                continue
            if type(child) not in (LinearAllreduce, LinearLayer) or getattr(child, "gather_output", False):
                continue
            if isinstance(child, LinearAllreduce):
                setattr(parent, name, RowParallelLinear(child.weight, child.bias, child.mp_group))
            else:
                setattr(parent, name, _linear(child.weight, child.bias))


class PackedLinear(torch.nn.Module):
    """``F.linear`` of a CPU weight packed once (the original is dropped) for ``kernel``: ``'onednn'`` (oneDNN's
    blocked layout, its matmul) or ``'raytp'`` (raytp's bf16 layout and kernel, ``raytp.gang.cpu_linear``).
    ``index``: its place among its model's packed linears (``prepack_linears`` numbers them), through which a
    compiled step reaches the weight (``packed_linear``); None: not reachable from a graph."""

    def __init__(self, linear: torch.nn.Linear, min_rows: int = 1, index: int | None = None,
                 kernel: str = "onednn"):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.index = index
        weight = linear.weight.detach()
        if kernel == "raytp":
            packed = cpu_linear.pack(weight)
            self.min_rows = 1  # its rows are computed alike in any batch: nothing to pad
        else:
            # batch-size hint 1: decode rows are what is bandwidth-bound; larger batches stay compute-bound anyway
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
            self.min_rows = min_rows  # 2: a single row computed as two (the same bits as in any larger batch)
        # a buffer, not an attribute, so whatever walks a model's tensors (weight counts in reports) sees it
        self.register_buffer("packed", packed, persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        m = rows.shape[0]
        if m < self.min_rows:
            rows = rows.expand(self.min_rows, -1)
        if self.index is not None and torch.compiler.is_compiling():  # traced: the opaque op, no weight in the graph
            out = torch.ops.raytp.packed_linear(rows, self.index, self.out_features, self.bias)
        else:
            out = _product(rows, self.packed, self.out_features, self.bias)
        return out[:m].view(*x.shape[:-1], self.out_features)


def _product(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] times a weight ``PackedLinear`` packed (either kernel's: a oneDNN tensor or raytp's layout)."""
    if packed.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return cpu_linear.linear(x, packed, out_features, bias)


# A compiled step calls its packed linears by index, not with the weight: a oneDNN tensor in a graph must be a
# frozen constant (Inductor lowers ``mkldnn._linear_pointwise`` only over one), and freezing bypasses AOTAutograd's
# cache and ties the compiled artefact to this model's values. By index, a graph holds no weight: the same graph
# (and its cached artefacts) serves every model of these shapes, and a restart reuses it all.
_weights: list = [None]  # the packed weights, by index, of the model whose compiled step runs: one step at a time


@contextmanager
def graph_weights(weights: list[torch.Tensor]):
    """Within: ``packed_linear`` multiplies by ``weights[index]`` (``packed_weights`` of the model being run)."""
    _weights[0] = weights
    try:
        yield
    finally:
        _weights[0] = None


def packed_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The packed weights of ``model``'s ``PackedLinear``s, in ``index`` order."""
    found = {m.index: m.packed for m in model.modules() if isinstance(m, PackedLinear) and m.index is not None}
    return [found[i] for i in range(len(found))]


def packed_linear(x: torch.Tensor, index: int, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``torch.ops.raytp.packed_linear``: x [M, K] times the packed linear ``index`` of the running model
    (``graph_weights``) → [M, out_features]."""
    weights = _weights[0]
    if weights is None:
        raise RuntimeError("raytp::packed_linear called outside a compiled step (raytp.gang.linears.graph_weights)")
    return _product(x, weights[index], out_features, bias)


# registered as a plain CPU kernel, not through ``torch.library.custom_op``, whose wrapper costs ~4 us more per call
# (measured, 64x64 bf16: 13.5 us direct, 16.0 this way, 20.0 as a custom_op) - 168 calls a step in the 0.5B
_lib = torch.library.Library("raytp", "FRAGMENT")
_lib.define("packed_linear(Tensor x, int index, int out_features, Tensor? bias) -> Tensor")
_lib.impl("packed_linear", packed_linear, "CPU")


@torch.library.register_fake("raytp::packed_linear")
def _(x, index, out_features, bias):
    return x.new_empty((x.shape[0], out_features))


def can_prepack(dtype: torch.dtype) -> bool:
    """oneDNN is in this torch build and computes ``dtype`` here (bf16 needs the CPU's native support)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def prepack_linears(model: torch.nn.Module, min_rows: int = 1, kernel: str = "onednn") -> int:
    """Replace every plain ``nn.Linear`` of a CPU model by a ``PackedLinear`` (``min_rows``, ``kernel``: its
    arguments; raytp's kernel only where the weight and bias are bf16 and the width even, oneDNN's elsewhere);
    returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                fits = (child.weight.dtype == torch.bfloat16 and child.in_features % 2 == 0
                        and (child.bias is None or child.bias.dtype == torch.bfloat16))
                setattr(parent, name, PackedLinear(child, min_rows, index=count,
                                                   kernel=kernel if fits else "onednn"))
                count += 1
    return count


def release_checkpoint(model: torch.nn.Module) -> None:
    """Copy a prepacked model's remaining tensors (embeddings, norms, biases: a small part of it) out of the
    checkpoint's memory map. The reorder read every linear's pages of that map; while any tensor still views the
    map, those pages stay resident beside the packed copies (the 0.5B at TP=1: 2.18 GB of RSS after loading, 1.34 GB
    with this)."""
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                param.data = param.data.clone()
            for name, buf in list(module.named_buffers(recurse=False)):
                if buf is not None and not buf.is_mkldnn and not isinstance(module, PackedLinear):
                    module._buffers[name] = buf.clone()
