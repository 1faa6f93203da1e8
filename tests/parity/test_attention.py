"""Every backend of causal_attention against references written elsewhere: torch's math SDPA kernel and float64."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lit_open.model import causal_attention

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def torch_math_reference(q, k, v):
    """torch's own math kernel in float64, GQA by repeating key/value heads as HF's repeat_kv does."""
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)


def float64_reference(q, k, v):
    """Attention written out loop by loop over query positions, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.size(1) // k.size(1)
    out = torch.empty_like(q)
    for h in range(q.size(1)):
        kh, vh = k[:, h // groups], v[:, h // groups]
        for t in range(q.size(2)):
            scores = (q[:, h, t : t + 1] @ kh[:, : t + 1].transpose(-2, -1)) / q.size(-1) ** 0.5
            out[:, h, t] = (scores.softmax(-1) @ vh[:, : t + 1]).squeeze(1)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("T", [1, 7, 64])
@pytest.mark.parametrize("backend", ["auto", "sdpa", "math"])
def test_matches_torch_math_kernel(backend, T, heads, dtype):
    torch.manual_seed(T)
    hq, hkv = heads
    q = torch.randn(2, hq, T, 32, dtype=dtype)
    k = torch.randn(2, hkv, T, 32, dtype=dtype)
    v = torch.randn(2, hkv, T, 32, dtype=dtype)
    out = causal_attention(q, k, v, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), torch_math_reference(q, k, v), **TOLERANCE[dtype])


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_matches_explicit_float64(backend, heads):
    torch.manual_seed(0)
    hq, hkv = heads
    q, k, v = torch.randn(1, hq, 9, 8), torch.randn(1, hkv, 9, 8), torch.randn(1, hkv, 9, 8)
    torch.testing.assert_close(
        causal_attention(q, k, v, backend).double(), float64_reference(q, k, v), atol=1e-5, rtol=1e-5
    )


def test_references_agree():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    torch.testing.assert_close(torch_math_reference(q, k, v), float64_reference(q, k, v))


def test_gradients_match_between_backends():
    torch.manual_seed(0)
    grads = {}
    for backend in ("sdpa", "math"):
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, h, 16, 8, requires_grad=True) for h in (4, 2, 2))
        causal_attention(q, k, v, backend).square().sum().backward()
        grads[backend] = (q.grad, k.grad, v.grad)
    for a, b in zip(grads["sdpa"], grads["math"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_rejects_bad_input():
    q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 3, 3, 8)
    with pytest.raises(ValueError, match="share"):
        causal_attention(q, kv, kv)
    with pytest.raises(ValueError, match="backend"):
        causal_attention(q, q, q, backend="flash")
