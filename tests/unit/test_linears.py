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
