"""The decoder's own invariants: causality, shapes, tying, init, meta-device materialisation, RoPE."""

import math

import pytest
import torch

from lit_open.errors import UserError
from lit_open.model import ModelConfig, Transformer, num_parameters
from lit_open.model.model import apply_rope, rope_tables

TINY = dict(vocab_size=100, pad_vocab_multiple=16, n_layer=2, d_model=64, d_ff=96, max_seq_len=16)
CONFIGS = {
    "llama_gqa": dict(family="llama", n_head=4, n_kv_head=2, tie_embeddings=True),
    "olmo2": dict(family="olmo2", n_head=4, norm_placement="post", qk_norm="full", norm_eps=1e-6),
    "olmo2_gqa": dict(family="olmo2", n_head=4, n_kv_head=1, norm_placement="post", qk_norm="full"),
    "head_qk_norm": dict(family="llama", n_head=4, n_kv_head=2, qk_norm="head"),
    "gpt_neox": dict(
        family="gpt_neox",
        n_head=4,
        norm="layernorm",
        parallel_residual=True,
        mlp="gelu",
        bias=True,
        rotary_fraction=0.25,
    ),
}


def tiny(name: str, **overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **CONFIGS[name], **overrides})


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_causal(name, backend):
    torch.manual_seed(0)
    model = Transformer(tiny(name, attention=backend)).eval()
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        before = model(ids)
        for t in (0, 5, 11):
            changed = ids.clone()
            changed[:, t] = (changed[:, t] + 1) % 100
            after = model(changed)
            torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
            assert not torch.allclose(after[:, t], before[:, t])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_output_shape_uses_padded_vocab(name):
    config = tiny(name)
    assert config.padded_vocab_size == 112
    logits = Transformer(config)(torch.randint(0, 100, (3, 7)))
    assert logits.shape == (3, 7, 112)
    assert logits.dtype == torch.float32


def test_no_padding_with_multiple_one():
    config = tiny("llama_gqa", vocab_size=101, pad_vocab_multiple=1)
    assert Transformer(config)(torch.zeros(1, 2, dtype=torch.long)).shape[-1] == 101


def test_tied_embeddings_share_storage():
    model = Transformer(tiny("llama_gqa"))
    assert model.output.weight is model.tok_embeddings.weight
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    untied = Transformer(tiny("olmo2"))
    assert untied.output.weight.data_ptr() != untied.tok_embeddings.weight.data_ptr()
    # Counted once: exactly one embedding matrix fewer than the untied twin.
    twin = Transformer(tiny("llama_gqa", tie_embeddings=False))
    assert num_parameters(twin) - num_parameters(model) == 112 * 64


def test_sequence_longer_than_context_raises():
    model = Transformer(tiny("llama_gqa"))
    model(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def _truncated_std(cutoff: float) -> float:
    """Standard deviation of a unit normal truncated at +-cutoff."""
    pdf = math.exp(-(cutoff**2) / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(cutoff / math.sqrt(2))
    return math.sqrt(1 - 2 * cutoff * pdf / mass)


@pytest.mark.parametrize("cutoff", [3.0, 1.5, None])
def test_init_statistics(cutoff):
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=512,
        n_layer=8,
        d_model=256,
        n_head=4,
        d_ff=512,
        max_seq_len=16,
        bias=True,
        init_std=0.05,
        init_cutoff=cutoff,
        init_scale_output=True,
    )
    model = Transformer(config)
    scale = 1.0 if cutoff is None else _truncated_std(cutoff)
    out_std = 0.05 / math.sqrt(2 * 8)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.all(p == 1), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:
            std = out_std if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")) else 0.05
            assert p.std().item() == pytest.approx(std * scale, rel=0.03), name
            assert p.mean().abs().item() < std * 0.02, name
            if cutoff is not None:
                assert p.abs().max().item() <= cutoff * std + 1e-7, name
            else:
                assert p.abs().max().item() > 3.5 * std, name  # nothing cut off


def test_init_without_output_scaling():
    model = Transformer(ModelConfig(vocab_size=128, n_layer=8, d_model=256, n_head=4, d_ff=256, max_seq_len=8))
    for module in (model.layers[0].attention.wo, model.layers[0].feed_forward.w2):
        assert module.weight.std().item() == pytest.approx(0.02 * _truncated_std(3.0), rel=0.03)


@pytest.mark.parametrize("name", ["llama_gqa", "olmo2", "gpt_neox"])
def test_meta_device_then_materialise(name):
    config = tiny(name)
    with torch.device("meta"):
        model = Transformer(config)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    model.to_empty(device="cpu")
    torch.manual_seed(1)
    model.init_weights()

    torch.manual_seed(0)
    direct = Transformer(config)
    assert torch.equal(model.rope_cos, direct.rope_cos)
    assert torch.equal(model.rope_sin, direct.rope_sin)
    assert model.rope_cos.dtype == torch.float32
    assert (model.output.weight is model.tok_embeddings.weight) == config.tie_embeddings
    # Same seed before init_weights: same parameters, whichever way the model was built.
    torch.manual_seed(1)
    direct.init_weights()
    for (key, a), (_, b) in zip(model.state_dict().items(), direct.state_dict().items()):
        assert torch.equal(a, b), key
    ids = torch.randint(0, 100, (2, 9))
    torch.testing.assert_close(model(ids), direct(ids), rtol=0, atol=0)


def test_state_dict_has_no_rope_buffers():
    assert not any("rope" in key for key in Transformer(tiny("llama_gqa")).state_dict())


def test_rope_tables_survive_bfloat16_cast():
    model = Transformer(tiny("llama_gqa")).to(torch.bfloat16)
    model.init_weights()
    cos, sin = rope_tables(16, 16, 10000.0)
    assert torch.equal(model.rope_cos, cos.to(torch.bfloat16))
    assert torch.equal(model.rope_sin, sin.to(torch.bfloat16))
    assert model(torch.randint(0, 100, (1, 16))).dtype == torch.bfloat16


def test_partial_rotary_leaves_other_dims_untouched():
    config = tiny("gpt_neox")
    assert (config.head_dim, config.rotary_dim) == (16, 4)
    model = Transformer(config)
    q = torch.randn(2, 10, 4, 16)
    out = apply_rope(q, model.rope_cos[:10], model.rope_sin[:10])
    assert torch.equal(out[..., 4:], q[..., 4:])
    assert torch.equal(out[:, 0], q[:, 0])  # position 0 is not rotated
    assert not torch.allclose(out[:, 1:, :, :4], q[:, 1:, :, :4])
    # A rotation: per position and head, the norm of the rotated pairs is kept.
    torch.testing.assert_close(out[..., :4].norm(dim=-1), q[..., :4].norm(dim=-1))


def test_rope_is_relative():
    """q.k after RoPE depends only on the distance between positions."""
    cos, sin = rope_tables(32, 8, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i: int, j: int) -> torch.Tensor:
        return (apply_rope(q, cos[i : i + 1], sin[i : i + 1]) * apply_rope(k, cos[j : j + 1], sin[j : j + 1])).sum()

    torch.testing.assert_close(score(5, 2), score(20, 17))
    torch.testing.assert_close(score(9, 9), (q * k).sum())


def test_naming_contract_and_qk_norm_shapes():
    full = Transformer(tiny("olmo2_gqa")).layers[0].attention
    assert full.q_norm.weight.shape == (64,) and full.k_norm.weight.shape == (16,)
    head = Transformer(tiny("head_qk_norm")).layers[0].attention
    assert head.q_norm.weight.shape == (16,) and head.k_norm.weight.shape == (16,)
    plain = Transformer(tiny("llama_gqa")).layers[0].attention
    assert not hasattr(plain, "q_norm")
    assert plain.wk.weight.shape == (32, 64)  # 2 key/value heads of 16


def test_bad_config_is_a_user_error():
    with pytest.raises(UserError, match="n_kv_head"):
        tiny("llama_gqa", n_kv_head=3)
    with pytest.raises(UserError, match="rotary_fraction"):
        tiny("gpt_neox", rotary_fraction=0.05)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_document_mask_makes_each_packed_document_independent(name):
    """With doc_ids a packed document's logits equal those of the document alone (RoPE is relative)."""
    torch.manual_seed(0)
    model = Transformer(tiny(name, attention="dense")).eval()
    first, second = torch.randint(0, 100, (1, 5)), torch.randint(0, 100, (1, 8))
    packed = torch.cat([first, second], dim=1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 8])
    with torch.no_grad():
        together = model(packed, doc_ids)
        alone = model(second)
        unmasked = model(packed)
    torch.testing.assert_close(together[:, 5:], alone, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(together[:, :5], unmasked[:, :5])  # the first document saw nothing else anyway
    assert not torch.allclose(unmasked[:, 5:], alone, atol=1e-3)  # without the mask the second one sees the first
