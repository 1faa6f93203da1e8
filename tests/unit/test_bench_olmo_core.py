"""The benchmark's `olmo_core` runner (lit_open/bench/olmo_core.py): why it cannot run, and, where OLMo-core imports,
its model against lit-open's for the same config: parameter count, the same loss from the same weights, training."""

from __future__ import annotations

import math
import re

import pytest
import torch

from lit_open.bench import olmo_core as oc
from lit_open.compose import load_train_config
from lit_open.errors import UserError
from lit_open.model import ModelConfig, Transformer
from lit_open.train.loss import lm_loss

TINY = dict(vocab_size=100, pad_vocab_multiple=16, n_layer=2, d_model=64, d_ff=96, max_seq_len=32)
LAYOUTS = {
    "llama_tied": dict(n_head=4, tie_embeddings=True),
    "olmo2": dict(family="olmo2", n_head=4, norm_placement="post", qk_norm="full", norm_eps=1e-6, rope_theta=5e5),
    "gqa_head_qk_norm_bias": dict(n_head=4, n_kv_head=2, qk_norm="head", bias=True),
    "layernorm_partial_rope": dict(n_head=4, head_dim=32, norm="layernorm", rotary_fraction=0.5),
}
PYTHIA = dict(family="gpt_neox", n_head=4, norm="layernorm", parallel_residual=True, mlp="gelu", bias=True)
# lit-open's parameter names -> OLMo-core's (`build_olmo_core_model`'s, whose head projection sits in ChunkedLossHead)
RENAMES = [
    (r"^tok_embeddings\.", "embeddings."),
    (r"^layers\.", "blocks."),
    (r"\.attention\.w([qkv])\.", r".attention.w_\1."),
    (r"\.attention\.wo\.", ".attention.w_out."),
    (r"\.ffn_norm\.", ".feed_forward_norm."),
    (r"^norm\.", "lm_head.norm."),
    (r"^output\.", "lm_head.w_out.projection."),
]


def tiny(layout: dict) -> ModelConfig:
    return ModelConfig(**{**TINY, **layout})


def train_config(model: ModelConfig):
    cfg = load_train_config(["model=quickstart", "data.seq_len=16", "data.micro_batch_size=2"])
    cfg.model = model
    cfg.strategy.loss_chunk_tokens = 8  # chunked: two chunks per sequence
    return cfg


def require_olmo_core() -> None:
    if why := oc.olmo_core_unavailable():
        pytest.skip(why)


# -- without OLMo-core -----------------------------------------------------------------------------------------


def test_unavailable_says_how_to_install_when_olmo_core_is_absent():
    why = oc.olmo_core_unavailable()
    if why is None:
        pytest.skip("OLMo-core imports here")
    assert isinstance(why, str) and why.startswith("OLMo-core")
    assert "pip install --no-deps ai2-olmo-core" in why or "torch" in why, why


@pytest.mark.parametrize(
    "error, expected",
    [
        (ModuleNotFoundError("No module named 'olmo_core'", name="olmo_core"), "OLMo-core is not installed ("),
        (ModuleNotFoundError("No module named 'bettermap'", name="bettermap"), "needs the module 'bettermap'"),
        (AttributeError("module 'torch' has no attribute 'gone'"), f"with torch {torch.__version__}"),
    ],
)
def test_unavailable_reason_names_the_cause(monkeypatch, error, expected):
    def fail():
        raise error

    monkeypatch.setattr(oc, "_import_olmo_core", fail)
    why = oc.olmo_core_unavailable(tiny(LAYOUTS["olmo2"]))
    assert isinstance(why, str) and expected in why, why
    if isinstance(error, AttributeError):  # against this torch: the pin and the error itself
        assert "it requires" in why and "AttributeError: module 'torch' has no attribute 'gone'" in why


def test_layouts_olmo_core_cannot_express_are_refused(monkeypatch):
    monkeypatch.setattr(oc, "_import_olmo_core", lambda: None)  # the layout check needs no OLMo-core
    assert "model.mlp=gelu" in oc.olmo_core_unavailable(tiny(PYTHIA))
    assert "parallel_residual" in oc.olmo_core_unavailable(tiny({**PYTHIA, "mlp": "swiglu"}))
    assert oc.olmo_core_unavailable(tiny(LAYOUTS["olmo2"])) is None


# -- with OLMo-core --------------------------------------------------------------------------------------------


def test_olmo_core_config_refuses_a_gelu_mlp():
    require_olmo_core()
    with pytest.raises(UserError, match="FeedForward is always gated"):
        oc.olmo_core_config(tiny(PYTHIA))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_same_parameters_and_loss_as_lit_open_from_the_same_weights(layout):
    """Same parameter count and shapes; with lit-open's weights copied in, the same loss: the layout is the same."""
    require_olmo_core()
    config = tiny(LAYOUTS[layout])
    cfg = train_config(config)
    torch.manual_seed(0)
    lit = Transformer(config)
    model = oc.build_olmo_core_model(cfg, torch.device("cpu"))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in lit.parameters())
    assert oc.olmo_core_config(config).num_params == sum(p.numel() for p in lit.parameters())
    state = {}
    for name, value in lit.state_dict().items():
        for pattern, new in RENAMES:
            name = re.sub(pattern, new, name)
        state[name] = value
    if config.tie_embeddings:
        state.pop("lm_head.w_out.projection.weight")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and missing == (["lm_head.w_out.projection.weight"] if config.tie_embeddings else [])
    ids = torch.randint(config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = lm_loss(lit(ids[:, :-1], return_hidden=True), lit.output, ids[:, 1:], 8).loss
        got = oc.olmo_core_loss(model, ids[:, :-1], ids[:, 1:])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_few_steps_on_a_fixed_batch_lower_the_loss():
    """OLMo-core's own init starts near ln(vocab); AdamW on one batch then lowers the loss step after step."""
    require_olmo_core()
    config = tiny(LAYOUTS["olmo2"])
    model = oc.build_olmo_core_model(train_config(config), torch.device("cpu"))
    ids = torch.randint(config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = oc.olmo_core_loss(model, ids[:, :-1], ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[0] == pytest.approx(math.log(config.padded_vocab_size), abs=0.3), losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
