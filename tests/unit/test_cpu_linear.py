"""raytp's CPU bf16 linear (``raytp.gang.cpu_linear``): what the plain linear computes (within bf16 rounding) for
every shape a step gives it, a row's bits the same alone and in any batch and at any thread count, and the choice
of kernel per config and CPU."""

import pytest
import torch

from raytp.errors import ConfigError
from raytp.gang import cpu_linear
from raytp.gang.linears import PackedLinear, graph_weights, packed_weights, prepack_linears

needs_kernel = pytest.mark.skipif(cpu_linear.unsupported_reason() is not None,
                                  reason=f"raytp's CPU linear: {cpu_linear.unsupported_reason()}")


def random_packed(n, k):
    """A seeded random bf16 weight [n, k] and its packed form."""
    torch.manual_seed(n * k)
    weight = torch.randn(n, k, dtype=torch.bfloat16)
    return weight, cpu_linear.pack(weight)


def reference(x, weight, bias):
    return torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())


@needs_kernel
@pytest.mark.parametrize("n, k", [(96, 64), (40, 96), (17, 2), (300, 130), (64, 1000)])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_the_float_product_within_bf16_rounding(n, k, bias):
    """Output widths off the 16-wide blocks (17, 40, 300) are masked, not written past; every row count from the
    one-row decode through the 6-row tiles and their remainders to a prompt chunk."""
    weight, packed = random_packed(n, k)
    b = torch.randn(n, dtype=torch.bfloat16) if bias else None
    for m in (1, 2, 5, 6, 7, 13, 64):
        x = torch.randn(m, k, dtype=torch.bfloat16)
        got = cpu_linear.linear(x, packed, n, b)
        assert got.shape == (m, n) and got.dtype == torch.bfloat16
        want = reference(x, weight, b)
        # fp32 accumulation, one bf16 rounding of the result
        torch.testing.assert_close(got.float(), want, rtol=8e-3, atol=1e-2 * want.abs().max().item())


@needs_kernel
def test_a_row_has_the_same_bits_alone_in_any_batch_and_at_any_thread_count():
    _, packed = random_packed(200, 256)
    x = torch.randn(40, 256, dtype=torch.bfloat16)
    batched = cpu_linear.linear(x, packed, 200, None)
    for start, m in ((0, 1), (3, 1), (5, 2), (7, 6), (11, 13), (1, 39)):
        assert torch.equal(cpu_linear.linear(x[start:start + m], packed, 200, None), batched[start:start + m])
    threads = torch.get_num_threads()
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            assert torch.equal(cpu_linear.linear(x, packed, 200, None), batched), t
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_rows_of_a_strided_view_read_at_their_stride():
    _, packed = random_packed(32, 64)
    wide = torch.randn(5, 160, dtype=torch.bfloat16)
    for x in (wide[:, 16:80], wide[:, ::2].t().contiguous().t()[:, :64]):
        assert torch.equal(cpu_linear.linear(x, packed, 32, None), cpu_linear.linear(x.contiguous(), packed, 32, None))


def test_pack_refuses_what_the_kernel_cannot_read():
    with pytest.raises(ValueError, match="bf16 weights of even width"):
        cpu_linear.pack(torch.randn(4, 8))
    with pytest.raises(ValueError, match="bf16 weights of even width"):
        cpu_linear.pack(torch.randn(4, 7, dtype=torch.bfloat16))


@needs_kernel
def test_an_input_that_does_not_fit_the_weight_is_refused_not_read_past():
    _, packed = random_packed(20, 64)
    with pytest.raises(ValueError, match="does not fit"):
        cpu_linear.linear(torch.randn(3, 96, dtype=torch.bfloat16), packed, 20, None)
    with pytest.raises(ValueError, match="does not fit"):
        cpu_linear.linear(torch.randn(3, 64), packed, 20, None)
    with pytest.raises(ValueError, match="does not fit"):
        cpu_linear.linear(torch.randn(3, 64, dtype=torch.bfloat16), packed, 40, None)


def test_kernel_choice():
    assert cpu_linear.kernel_for(torch.float32, "auto") == "onednn"
    assert cpu_linear.kernel_for(torch.bfloat16, "onednn") == "onednn"
    with pytest.raises(ConfigError, match="cpu_linear_kernel.*bfloat16 only"):
        cpu_linear.kernel_for(torch.float32, "raytp")
    if cpu_linear.unsupported_reason() is None:
        assert cpu_linear.kernel_for(torch.bfloat16, "raytp") == "raytp"
        want = "onednn" if torch.cpu._is_amx_tile_supported() else "raytp"
        assert cpu_linear.kernel_for(torch.bfloat16, "auto") == want
    else:
        with pytest.raises(ConfigError, match="cannot run on this node"):
            cpu_linear.kernel_for(torch.bfloat16, "raytp")
        assert cpu_linear.kernel_for(torch.bfloat16, "auto") == "onednn"


@needs_kernel
def test_a_model_packed_for_it_runs_eager_and_compiled_by_index():
    """``prepack_linears(kernel='raytp')``: every even-width bf16 linear gets raytp's layout (an odd-width or a
    float32 one keeps oneDNN's); eager and a compiled step (``raytp::packed_linear`` by index) give the same bits."""
    fp32 = torch.nn.Sequential(torch.nn.Linear(8, 8))
    assert prepack_linears(fp32, kernel="raytp") == 1 and fp32[0].packed.is_mkldnn
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.ReLU(), torch.nn.Linear(32, 9, bias=False),
                                torch.nn.Linear(9, 7)).to(torch.bfloat16)
    plain = [layer for layer in model if isinstance(layer, torch.nn.Linear)]
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    with torch.inference_mode():
        want = model(x)
        assert prepack_linears(model, kernel="raytp") == 3
        packed = [layer for layer in model if isinstance(layer, PackedLinear)]
        assert [p.packed.is_mkldnn for p in packed] == [False, False, True]
        assert all(p.in_features == q.in_features for p, q in zip(packed, plain))
        eager = model(x)
        torch.testing.assert_close(eager.float(), want.float(), rtol=2e-2, atol=2e-2)
        torch._dynamo.reset()
        step = torch.compile(lambda m, x: m(x), backend="eager", fullgraph=True)
        with graph_weights(packed_weights(model)):
            assert torch.equal(step(model, x), eager)
