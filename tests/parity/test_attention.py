"""Every backend of causal_attention against references written elsewhere: torch's math SDPA kernel and float64.

Document masking is checked against attention run separately on each document, so no mask built by the code under
test takes part in the reference. The GPU-only kernels' glue (layouts, cu_seqlens, GQA) is also checked on CPU by
standing in a per-sequence SDPA for the CUDA kernel; the kernels themselves run in the tests marked gpu.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lit_open.errors import UserError
from lit_open.model import attention
from lit_open.model.attention import available_backends, causal_attention, doc_ids_from_tokens
from lit_open.model.config import ATTENTION_BACKENDS, ModelConfig

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
CPU_BACKENDS = available_backends("cpu")
HEADS = {"mha": (4, 4), "gqa": (4, 2)}
# Three rows with different boundaries: one-token documents at the start, middle and end; ids that skip values;
# a row that is one document with a non-zero id.
DOC_IDS = torch.tensor(
    [
        [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2],
        [0, 1, 1, 1, 2, 3, 3, 3, 3, 3, 7],
        [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4],
    ],
    dtype=torch.int32,
)


def torch_math_reference(q, k, v):
    """torch's own math kernel in float64, GQA by repeating key/value heads as HF's repeat_kv does."""
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)


def per_document_reference(q, k, v, doc_ids):
    """torch's math kernel in float64 run on each document of each row on its own (runs found by a plain loop)."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, row in enumerate(doc_ids.tolist()):
        start = 0
        for t in range(1, len(row) + 1):
            if t == len(row) or row[t] != row[start]:
                document = (slice(b, b + 1), slice(None), slice(start, t))
                out[document] = torch_math_reference(q[document], k[document], v[document])
                start = t
    return out


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


def random_qkv(B, heads, T, D, dtype=torch.float32, device="cpu", seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    return [
        torch.randn(B, h, T, D, generator=generator).to(device, dtype).requires_grad_(requires_grad)
        for h in (hq, hkv, hkv)
    ]


def random_doc_ids(B, T, seed=0):
    """Rows of documents with random boundaries, 1 to 40 tokens long (so some span several 128-token blocks)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (B, T), generator=generator)
    return torch.stack([torch.repeat_interleave(torch.arange(T), row)[:T] for row in lengths]).int()


def test_backend_names_match_config():
    assert set(attention._BACKENDS) | {"auto"} == set(ATTENTION_BACKENDS)
    for name in ATTENTION_BACKENDS:
        assert ModelConfig(attention=name).attention == name


def test_cpu_backends():
    assert CPU_BACKENDS == ["auto", "sdpa", "flex", "dense", "math"]
    assert available_backends("cpu", torch.float32, backward=True) == ["auto", "sdpa", "dense", "math"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("T", [1, 7, 64])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_torch_math_kernel(backend, T, heads, dtype):
    q, k, v = random_qkv(2, heads, T, 32, dtype, seed=T)
    out = causal_attention(q, k, v, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), torch_math_reference(q, k, v), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_documents_match_per_document_reference(backend, heads, dtype):
    q, k, v = random_qkv(3, heads, 11, 16, dtype)
    out = causal_attention(q, k, v, backend, doc_ids=DOC_IDS)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), per_document_reference(q, k, v, DOC_IDS), **TOLERANCE[dtype])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_documents_across_mask_blocks(backend):
    """Longer than flex's 128-token blocks, so some blocks are partly masked and some skipped."""
    doc_ids = random_doc_ids(2, 200)
    q, k, v = random_qkv(2, (4, 2), 200, 8)
    out = causal_attention(q, k, v, backend, doc_ids=doc_ids)
    torch.testing.assert_close(out.double(), per_document_reference(q, k, v, doc_ids), **TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_document_is_plain_causal(backend):
    q, k, v = random_qkv(2, (4, 2), 9, 8)
    one_document = torch.zeros(2, 9, dtype=torch.int64)
    torch.testing.assert_close(causal_attention(q, k, v, backend, one_document), causal_attention(q, k, v, backend))


def test_flex_builds_one_block_mask_per_doc_ids_tensor():
    """Every layer passes the same doc_ids, so the mask is reused; an in-place edit or a new tensor rebuilds it."""
    doc_ids = DOC_IDS.clone()
    mask = attention._block_mask(doc_ids, 11, torch.device("cpu"))
    assert attention._block_mask(doc_ids, 11, torch.device("cpu")) is mask
    assert attention._block_mask(doc_ids.clone(), 11, torch.device("cpu")) is not mask
    q, k, v = random_qkv(3, (4, 2), 11, 8)
    causal_attention(q, k, v, "flex", doc_ids)
    doc_ids[0, 5:] += 1  # a new document starts at position 5 of row 0
    torch.testing.assert_close(
        causal_attention(q, k, v, "flex", doc_ids).double(),
        per_document_reference(q, k, v, doc_ids),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
def test_matches_explicit_float64(backend, heads):
    q, k, v = random_qkv(1, heads, 9, 8)
    torch.testing.assert_close(
        causal_attention(q, k, v, backend).double(), float64_reference(q, k, v), atol=1e-5, rtol=1e-5
    )


def test_references_agree():
    q, k, v = random_qkv(2, (4, 2), 5, 8)
    torch.testing.assert_close(torch_math_reference(q, k, v), float64_reference(q, k, v))
    one_document = torch.zeros(2, 5, dtype=torch.int32)
    torch.testing.assert_close(per_document_reference(q, k, v, one_document), float64_reference(q, k, v))


@pytest.mark.parametrize("doc_ids", [None, DOC_IDS], ids=["causal", "documents"])
def test_gradients_match_between_backends(doc_ids):
    """Every backend with a CPU backward pass against float64 autograd through the reference."""
    q, k, v = random_qkv(3, (4, 2), 11, 8, torch.float64, requires_grad=True)
    reference = per_document_reference(q, k, v, torch.zeros(3, 11) if doc_ids is None else doc_ids)
    expected = torch.autograd.grad(reference.square().sum(), (q, k, v))
    for backend in available_backends("cpu", torch.float32, backward=True):
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        causal_attention(q32, k32, v32, backend, doc_ids).double().square().sum().backward()
        for name, got, want in zip("qkv", (q32.grad, k32.grad, v32.grad), expected):
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4, msg=f"{backend} d{name}")


def test_flex_without_gradients_on_cpu():
    """Flex has no CPU backward: it runs for evaluation, and refuses inputs that need gradients."""
    q, k, v = random_qkv(1, (4, 2), 7, 8)
    torch.testing.assert_close(causal_attention(q, k, v, "flex"), causal_attention(q, k, v, "math"))
    q.requires_grad_()
    with pytest.raises(UserError, match="model.attention=flex .*no backward pass on cpu"):
        causal_attention(q, k, v, "flex")


@pytest.mark.parametrize(
    "tokens, expected",
    [
        ([[7, 2, 5, 6, 2, 2, 9]], [[0, 0, 1, 1, 1, 2, 3]]),  # EOS ends its document; an empty document between two
        ([[2, 5, 5, 2]], [[0, 1, 1, 1]]),  # EOS first and last
        ([[5, 6, 7]], [[0, 0, 0]]),  # no EOS: one document
        ([[2, 5, 6], [5, 2, 6]], [[0, 1, 1], [0, 0, 1]]),  # rows count on their own
    ],
)
def test_doc_ids_from_tokens(tokens, expected):
    doc_ids = doc_ids_from_tokens(torch.tensor(tokens), eos_id=2)
    assert doc_ids.dtype == torch.int32
    assert doc_ids.tolist() == expected


def test_cu_seqlens_cover_every_row_and_document():
    cu_seqlens, max_seqlen = attention._cu_seqlens(DOC_IDS)
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == [0, 3, 7, 11, 12, 15, 16, 21, 22, 33]
    assert max_seqlen == 11


def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=None, causal=None, enable_gqa=None):
    """A CPU stand-in for both varlen kernels: causal SDPA on each (T, H, D) sequence of the packed batch."""
    assert cu_q is cu_k and cu_q.dtype == torch.int32 and max_q == max_k == int(cu_q.diff().max())
    assert window_size == (-1, 0) or causal is True
    assert enable_gqa in (None, q.size(1) != k.size(1)), "varlen_attn refuses GQA without enable_gqa=True"
    out = torch.empty_like(q)
    bounds = cu_q.tolist()
    for start, end in zip(bounds, bounds[1:]):
        seq = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]
        out[start:end] = F.scaled_dot_product_attention(*seq, is_causal=True, enable_gqa=True)[0].transpose(0, 1)
    return out


def fake_flash_attn_func(q, k, v, causal):
    """A CPU stand-in for flash_attn_func, which takes and returns (B, T, H, D)."""
    assert causal
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True, enable_gqa=True)
    return out.transpose(1, 2)


@pytest.mark.parametrize("native_gqa", [True, False], ids=["torch-2.13-gqa", "repeat-kv"])
@pytest.mark.parametrize("doc_ids", [None, DOC_IDS], ids=["causal", "documents"])
@pytest.mark.parametrize("backend", ["flash_attn", "varlen"])
def test_cuda_kernel_glue_on_cpu(monkeypatch, backend, doc_ids, native_gqa):
    """Layouts, cu_seqlens and GQA around the CUDA kernels, checked with CPU stand-ins for the kernels."""
    monkeypatch.setattr(attention, "flash_attn_func", fake_flash_attn_func)
    monkeypatch.setattr(attention, "flash_attn_varlen_func", fake_varlen)
    monkeypatch.setattr(attention, "varlen_attn", fake_varlen)
    monkeypatch.setattr(attention, "_VARLEN_GQA", native_gqa)
    q, k, v = random_qkv(3, (4, 2), 11, 8)
    out = attention._BACKENDS[backend](q, k, v, doc_ids)
    reference = per_document_reference(q, k, v, torch.zeros(3, 11) if doc_ids is None else doc_ids)
    torch.testing.assert_close(out.double(), reference, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("backend", ["flash_attn", "varlen"])
def test_cuda_only_backends_refuse_cpu_clearly(backend):
    q = torch.randn(1, 2, 4, 8, dtype=torch.bfloat16)
    assert backend not in CPU_BACKENDS
    with pytest.raises(UserError) as error:
        causal_attention(q, q, q, backend)
    message = str(error.value)
    assert f"model.attention={backend} cannot run here" in message
    assert "model.attention=auto" in message and "model.attention=dense" in message
    assert "\n" not in message
    if backend == "flash_attn":
        assert "lit-open[flash]" in message


def test_auto_picks_dense_for_documents_on_cpu():
    """Eager flex materializes the scores and is slower than dense SDPA, so auto uses it only on CUDA."""
    q = torch.randn(1, 2, 4, 8)
    assert attention._fastest(q, has_docs=True, backward=False) == "dense"
    assert attention._fastest(q, has_docs=False, backward=False) == "sdpa"


def test_rejects_bad_input():
    q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 3, 3, 8)
    with pytest.raises(ValueError, match="share"):
        causal_attention(q, kv, kv)
    with pytest.raises(ValueError, match="backend"):
        causal_attention(q, q, q, backend="flash")
    with pytest.raises(ValueError, match="doc_ids"):
        causal_attention(q, q, q, doc_ids=torch.zeros(1, 4, dtype=torch.int32))


def cuda_or_skip(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = attention._why_unavailable(backend, torch.device("cuda"), torch.bfloat16, backward=True)
    if reason:
        pytest.skip(f"{backend} cannot run here: {reason}")


GPU_BACKENDS = [name for name in ATTENTION_BACKENDS if name != "math"]


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("documents", [False, True], ids=["causal", "documents"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_bf16_matches_reference(backend, documents, heads):
    """Each CUDA kernel (flex compiled) in bf16 against the float64 per-document reference, forward and backward."""
    cuda_or_skip(backend)
    doc_ids = random_doc_ids(2, 384, seed=1) if documents else None
    q, k, v = random_qkv(2, heads, 384, 64, torch.bfloat16, "cuda", requires_grad=True)
    out = causal_attention(q, k, v, backend, None if doc_ids is None else doc_ids.cuda())
    assert out.dtype == torch.bfloat16 and out.is_cuda
    cpu = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    reference = per_document_reference(*cpu, torch.zeros(2, 384) if doc_ids is None else doc_ids)
    torch.testing.assert_close(out.double().cpu(), reference, atol=2e-2, rtol=2e-2)
    out.float().square().sum().backward()
    reference.square().sum().backward()
    for name, got, want in zip("qkv", (q.grad, k.grad, v.grad), (t.grad for t in cpu)):
        torch.testing.assert_close(got.double().cpu(), want, atol=5e-2, rtol=5e-2, msg=f"{backend} d{name}")


@pytest.mark.gpu
def test_cuda_auto_picks_a_fused_kernel():
    cuda_or_skip("sdpa")
    q = torch.randn(1, 2, 4, 64, device="cuda", dtype=torch.bfloat16)
    fused = [name for name in ("flash_attn", "varlen") if name in available_backends("cuda")]
    assert attention._fastest(q, has_docs=True, backward=True) == (fused or ["flex"])[0]
    assert attention._fastest(q.float(), has_docs=True, backward=True) == "flex"


# flash-attn's varlen kernel with documents is test_cuda_bf16_matches_reference[flash_attn-documents-*] (and torch's
# own, [varlen-documents-*]); here cuDNN's fused attention, which `sdpa` and `dense` reach through SDPA's dispatch.
CUDNN_CASES = [("sdpa", False), ("dense", False), ("dense", True)]


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize(
    "backend, documents", CUDNN_CASES, ids=["sdpa-causal", "dense-causal-mask", "dense-document-mask"]
)
def test_cuda_cudnn_attention_bf16_matches_reference(backend, documents, heads):
    """cuDNN attention, the only kernel SDPA may pick here, under `sdpa` (is_causal) and `dense` (an explicit boolean
    mask, causal or causal and same-document) in bf16 against the float64 per-document reference, with gradients."""
    cuda_or_skip(backend)
    doc_ids = random_doc_ids(2, 384, seed=2) if documents else None
    q, k, v = random_qkv(2, heads, 384, 64, torch.bfloat16, "cuda", seed=2, requires_grad=True)
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = causal_attention(q, k, v, backend, None if doc_ids is None else doc_ids.cuda())
            out.float().square().sum().backward()
    except RuntimeError as error:  # what SDPA raises when no allowed kernel takes the inputs (its warnings say why)
        if not any(refusal in str(error) for refusal in ("No available kernel", "No viable backend")):
            raise
        pytest.skip(f"cuDNN attention refuses {backend} with these inputs (torch {torch.__version__}): {error}")
    assert out.dtype == torch.bfloat16 and out.is_cuda
    cpu = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    reference = per_document_reference(*cpu, torch.zeros(2, 384) if doc_ids is None else doc_ids)
    reference.square().sum().backward()
    # bf16 inputs and outputs (8 significant bits): the tolerances of the other CUDA kernels above
    torch.testing.assert_close(out.double().cpu(), reference, atol=2e-2, rtol=2e-2)
    for name, got, want in zip("qkv", (q.grad, k.grad, v.grad), (t.grad for t in cpu)):
        torch.testing.assert_close(got.double().cpu(), want, atol=5e-2, rtol=5e-2, msg=f"cuDNN {backend} d{name}")
