"""RMSNorm, SwiGLU and rotary helpers against their formulas computed independently in fp64.

Shape legend: B batch, S sequence, D dim, H heads, d head dim.
"""

import math

import pytest
import torch

from sparsetron.model.layers import FeedForward, RMSNorm, apply_rope, rope_tables

# A few ulps of the output dtype; the implementations accumulate in fp32 at least.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_formula(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 40, generator=g) * 3 + 0.5
    norm = RMSNorm(40, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(40, generator=g))
    x64, w64 = x.to(dtype).double(), norm.weight.double()
    expected = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * w64
    out = norm(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=TOL[dtype], atol=TOL[dtype])


def test_rmsnorm_eps_matters_for_tiny_inputs():
    x = torch.randn(2, 16) * 1e-4
    a, b = RMSNorm(16, eps=1e-5)(x), RMSNorm(16, eps=1e-12)(x)
    assert b.pow(2).mean(-1).sub(1).abs().max() < 1e-3  # tiny eps: unit RMS
    assert a.abs().max() < 0.1  # eps dominates the denominator


def test_feed_forward_is_swiglu():
    torch.manual_seed(2)
    ffn = FeedForward(24, 40).double()
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    w1, w2, w3 = ffn.w1.weight, ffn.w2.weight, ffn.w3.weight
    a = x @ w1.T
    expected = ((a / (1 + torch.exp(-a))) * (x @ w3.T)) @ w2.T
    torch.testing.assert_close(ffn(x), expected, rtol=1e-12, atol=1e-12)
    assert ffn.w1.bias is None and ffn.w2.bias is None and ffn.w3.bias is None


def test_feed_forward_init_stds():
    torch.manual_seed(3)
    ffn = FeedForward(256, 512)
    ffn.init_weights(std=0.02, out_std=0.005)
    assert ffn.w1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert ffn.w3.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert ffn.w2.weight.std().item() == pytest.approx(0.005, rel=0.05)


def rope_complex(x_BSHd, positions_BS, theta):
    """Reference: pair (x[i], x[i + d/2]) is the complex number x[i] + j x[i + d/2], turned by pos * theta^(-2i/d)."""
    d = x_BSHd.shape[-1]
    half = d // 2
    z = torch.complex(x_BSHd[..., :half].double(), x_BSHd[..., half:].double())
    freqs = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / d)
    angle_BSh = positions_BS.double()[..., None] * freqs
    rotated = z * torch.polar(torch.ones_like(angle_BSh), angle_BSh)[:, :, None, :]
    return torch.cat((rotated.real, rotated.imag), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_complex_rotation(dtype):
    g = torch.Generator().manual_seed(4)
    B, S, H, d, theta = 2, 13, 3, 24, 500000.0
    cos, sin = rope_tables(d, 3000, theta)
    assert cos.shape == (3000, d // 2) and cos.dtype == torch.float32
    x = torch.randn(B, S, H, d, generator=g).to(dtype)
    positions = torch.randint(0, 3000, (B, S), generator=g)
    out = apply_rope(x, cos, sin, positions)
    assert out.dtype == dtype
    expected = rope_complex(x, positions, theta)
    torch.testing.assert_close(out.double(), expected, rtol=TOL[dtype], atol=TOL[dtype])
    # Shared [S] positions broadcast over the batch.
    torch.testing.assert_close(
        apply_rope(x, cos, sin, positions[0]), apply_rope(x, cos, sin, positions[0].expand(B, S))
    )


def test_rope_score_depends_only_on_position_difference():
    g = torch.Generator().manual_seed(5)
    d = 32
    cos, sin = rope_tables(d, 512, 10000.0)
    q = torch.randn(1, 1, 1, d, generator=g).expand(1, 6, 1, d)
    k = torch.randn(1, 1, 1, d, generator=g).expand(1, 6, 1, d)
    # Query at m, key at n, for pairs with the same difference m - n = 7 and with other differences.
    m = torch.tensor([[7, 30, 100, 407, 10, 20]])
    n = torch.tensor([[0, 23, 93, 400, 0, 17]])
    scores = (apply_rope(q, cos, sin, m) * apply_rope(k, cos, sin, n)).sum(-1).flatten()
    torch.testing.assert_close(scores[:4], scores[0].expand(4), rtol=1e-5, atol=1e-5)
    assert (scores[4:] - scores[0]).abs().min() > 1e-3  # a different offset gives a different score
    # The rotation preserves the norm.
    rotated = apply_rope(q, cos, sin, m)
    torch.testing.assert_close(rotated.norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_rope_position_zero_is_identity_and_tables_are_exact():
    cos, sin = rope_tables(8, 100, 10000.0)
    torch.testing.assert_close(cos[0], torch.ones(4))
    torch.testing.assert_close(sin[0], torch.zeros(4))
    # Column 0 turns one radian per position; at 99 the angle is large, testing the fp64 angle.
    torch.testing.assert_close(cos[99, 0].double(), torch.tensor(math.cos(99.0), dtype=torch.float64))
    torch.testing.assert_close(sin[99, 3].double(), torch.tensor(math.sin(99.0 * 10000.0 ** (-6 / 8))).double())
    with pytest.raises(ValueError, match="even"):
        rope_tables(7, 10, 10000.0)
