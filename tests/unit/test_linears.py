"""CPU linears over oneDNN-prepacked weights compute what the plain linear computes, for every input shape a step
gives them (decode rows, prompt chunks, 3-D hidden states), with and without bias."""

import pytest
import torch

from raytp.gang.linears import PackedLinear, can_prepack, prepack_linears


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_the_plain_linear(dtype, bias):
    if not can_prepack(dtype):
        pytest.skip(f"oneDNN cannot compute {dtype} on this CPU")
    torch.manual_seed(0)
    plain = torch.nn.Linear(96, 40, bias=bias).to(dtype)
    packed = PackedLinear(plain)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    with torch.inference_mode():
        for shape in ((1, 96), (7, 96), (1, 5, 96), (1, 1, 96)):
            x = torch.randn(shape, dtype=dtype)
            torch.testing.assert_close(packed(x), plain(x), **tol)


@pytest.mark.skipif(not can_prepack(torch.float32), reason="oneDNN prepacking unavailable in this torch build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_min_rows_2_gives_a_row_the_same_bits_alone_as_in_any_batch(dtype):
    """``batch_invariant``'s linears: oneDNN rounds a one-row product differently (checked here, so this test can
    fail) and any product of two rows or more the same, row by row."""
    if not can_prepack(dtype):
        pytest.skip(f"no oneDNN {dtype} on this CPU")
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 384, bias=False).to(dtype)
    x = torch.randn(40, 256).to(dtype)
    plain, invariant = PackedLinear(linear), PackedLinear(linear, min_rows=2)
    batched = invariant(x)
    assert torch.equal(plain(x), batched)
    for m in (1, 2, 3, 7, 16):
        assert torch.equal(invariant(x[3:3 + m]), batched[3:3 + m]), m
    if dtype == torch.float32:
        assert not torch.equal(plain(x[3:4]), batched[3:4]), "oneDNN's one-row path now rounds as a batch does"


def test_prepack_linears_replaces_plain_linears_only():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.norm = torch.nn.LayerNorm(8)
            self.inner = torch.nn.Sequential(torch.nn.Linear(8, 4))

    if not can_prepack(torch.float32):
        pytest.skip("no oneDNN in this torch build")
    block = Block()
    assert prepack_linears(block) == 2
    assert isinstance(block.proj, PackedLinear) and isinstance(block.inner[0], PackedLinear)
    assert isinstance(block.norm, torch.nn.LayerNorm)


def test_prepacked_weights_count_in_the_rank_report():
    """The load report's weight bytes (and the roofline built on them) include prepacked weights, which live in
    opaque oneDNN tensors rather than parameters."""
    from raytp.gang.report import weight_bytes

    if not can_prepack(torch.float32):
        pytest.skip("no oneDNN in this torch build")
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16, bias=False))
    before = weight_bytes(model)
    assert prepack_linears(model) == 2
    assert weight_bytes(model) == before == (64 * 32 + 32 + 32 * 16) * 4


def test_a_prepacked_model_keeps_no_view_of_the_checkpoint():
    """After prepacking, the tensors left (here a norm and an embedding) are copied out of the storage the
    checkpoint gave them (a memory map, in a real load), so that storage can be released; values unchanged."""
    from raytp.gang.linears import release_checkpoint

    if not can_prepack(torch.float32):
        pytest.skip("no oneDNN in this torch build")
    checkpoint = torch.randn(4 * 8 + 8 + 8 * 8)  # one flat buffer, as a memory-mapped file would be
    model = torch.nn.Sequential(torch.nn.Embedding(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 8, bias=False))
    with torch.no_grad():
        model[0].weight.data = checkpoint[:32].view(4, 8)
        model[1].weight.data = checkpoint[32:40]
        model[2].weight.data = checkpoint[40:].view(8, 8)
    before = [p.detach().clone() for p in (model[0].weight, model[1].weight)]
    prepack_linears(model)
    release_checkpoint(model)
    base = checkpoint.untyped_storage().data_ptr()
    for param, want in zip((model[0].weight, model[1].weight), before):
        assert param.untyped_storage().data_ptr() != base
        assert torch.equal(param, want)


def test_a_compiled_module_reaches_its_packed_weights_by_index_and_holds_none():
    """Compiled, a prepacked model's linears are ``raytp::packed_linear`` calls by index (no oneDNN tensor in the
    graph: AOTAutograd caches it, and the same graph serves any model of these shapes) that multiply by the
    weights of the model being run, as its eager forward does; outside a compiled step the op refuses."""
    from raytp.gang.linears import graph_weights, packed_linear, packed_weights

    if not can_prepack(torch.float32):
        pytest.skip("no oneDNN in this torch build")
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8, bias=False))
        assert prepack_linears(model) == 2
        models.append(model)
    step = torch.compile(lambda m, x: m(x), backend=backend, fullgraph=True)
    x = torch.randn(5, 24)
    with torch.inference_mode():
        for model in models:
            with graph_weights(packed_weights(model)):
                torch.testing.assert_close(step(model, x), model(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(models[0](x), models[1](x))  # two models that a mix-up would show
    assert graphs, "nothing was compiled"
    ops = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert sum(op.startswith("raytp.packed_linear") for op in ops) == 2 * len(graphs), ops
    assert not any("mkldnn" in op for op in ops), ops
    with pytest.raises(RuntimeError, match="outside a compiled step"):
        packed_linear(x, 0, 32, None)
