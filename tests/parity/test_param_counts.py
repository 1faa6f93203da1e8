"""The presets against Hugging Face transformers: same parameter counts, same names, same logits on tiny models."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lit_open.model import ModelConfig, Transformer, num_parameters

transformers = pytest.importorskip("transformers")

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"

# The published config.json values, written here independently of conf/model/*.yaml.
HF = {
    "olmo2_1b": (
        "Olmo2",
        dict(  # allenai/OLMo-2-0425-1B
            hidden_size=2048,
            intermediate_size=8192,
            num_attention_heads=16,
            num_key_value_heads=16,
            num_hidden_layers=16,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            vocab_size=100352,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            tie_word_embeddings=False,
        ),
    ),
    "olmo2_7b": (
        "Olmo2",
        dict(  # allenai/OLMo-2-1124-7B
            hidden_size=4096,
            intermediate_size=11008,
            num_attention_heads=32,
            num_key_value_heads=32,
            num_hidden_layers=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            vocab_size=100352,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            tie_word_embeddings=False,
        ),
    ),
    "amber_7b": (
        "Llama",
        dict(  # LLM360/Amber
            hidden_size=4096,
            intermediate_size=11008,
            num_attention_heads=32,
            num_key_value_heads=32,
            num_hidden_layers=32,
            max_position_embeddings=2048,
            rms_norm_eps=1e-6,
            vocab_size=32000,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
        ),
    ),
    "k2_65b": (
        "Llama",
        dict(  # LLM360/K2
            hidden_size=8192,
            intermediate_size=22016,
            num_attention_heads=64,
            num_key_value_heads=64,
            num_hidden_layers=80,
            max_position_embeddings=2048,
            rms_norm_eps=1e-5,
            vocab_size=32032,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
        ),
    ),
    "pythia_160m": (
        "GPTNeoX",
        dict(  # EleutherAI/pythia-160m
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            max_position_embeddings=2048,
            layer_norm_eps=1e-5,
            vocab_size=50304,
            hidden_act="gelu",
            use_parallel_residual=True,
            attention_bias=True,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        ),
    ),
    "pythia_1b": (
        "GPTNeoX",
        dict(  # EleutherAI/pythia-1b
            hidden_size=2048,
            intermediate_size=8192,
            num_attention_heads=8,
            num_hidden_layers=16,
            max_position_embeddings=2048,
            layer_norm_eps=1e-5,
            vocab_size=50304,
            hidden_act="gelu",
            use_parallel_residual=True,
            attention_bias=True,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        ),
    ),
}
KNOWN = {"olmo2_1b": 1_484_916_736, "pythia_160m": 162_322_944}


def load_preset(name: str) -> ModelConfig:
    return ModelConfig(**OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml")))


def hf_model(arch: str, **kwargs):
    config = getattr(transformers, f"{arch}Config")(**kwargs)
    return getattr(transformers, f"{arch}ForCausalLM")(config)


@pytest.mark.parametrize("name", list(HF))
def test_preset_parameter_count_matches_transformers(name):
    arch, kwargs = HF[name]
    config = load_preset(name)
    assert config.name == name
    assert config.padded_vocab_size == kwargs["vocab_size"]  # the published embedding shape
    with torch.device("meta"):
        ours = num_parameters(Transformer(config))
        theirs = num_parameters(hf_model(arch, **kwargs))
    assert ours == theirs
    if name in KNOWN:
        assert ours == KNOWN[name]


def test_every_preset_describes_itself_and_loads():
    for path in sorted(CONF.glob("*.yaml")):
        assert path.read_text().startswith("# "), path.name
        assert load_preset(path.stem).name == path.stem


# Tiny models of each family: the names we promise, and the same logits as transformers given the same weights.
TINY = {
    "llama": (
        dict(family="llama", n_head=4, n_kv_head=2, norm_eps=1e-6, rope_theta=500.0),
        (
            "Llama",
            dict(
                num_attention_heads=4,
                num_key_value_heads=2,
                rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 500.0},
            ),
        ),
    ),
    "olmo2": (
        dict(family="olmo2", n_head=4, n_kv_head=2, norm_eps=1e-6, norm_placement="post", qk_norm="full"),
        (
            "Olmo2",
            dict(
                num_attention_heads=4,
                num_key_value_heads=2,
                rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
        ),
    ),
    "gpt_neox": (
        dict(
            family="gpt_neox",
            n_head=4,
            norm="layernorm",
            parallel_residual=True,
            mlp="gelu",
            bias=True,
            rotary_fraction=0.25,
        ),
        (
            "GPTNeoX",
            dict(
                num_attention_heads=4,
                layer_norm_eps=1e-5,
                hidden_act="gelu",
                use_parallel_residual=True,
                attention_bias=True,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            ),
        ),
    ),
}
SIZES = dict(vocab_size=128, n_layer=2, d_model=64, d_ff=96, max_seq_len=32)
HF_SIZES = dict(
    vocab_size=128,
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=96,
    max_position_embeddings=32,
    tie_word_embeddings=False,
)


def expected_names(family: str) -> set[str]:
    bias = family == "gpt_neox"
    per_layer = ["attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2"]
    per_layer += [] if family == "gpt_neox" else ["feed_forward.w3"]
    norms = ["attention_norm", "ffn_norm"] + (["attention.q_norm", "attention.k_norm"] if family == "olmo2" else [])
    names = {"tok_embeddings.weight", "output.weight", "norm.weight"} | ({"norm.bias"} if bias else set())
    for i in range(2):
        for module in per_layer + norms:
            names.add(f"layers.{i}.{module}.weight")
            if bias:
                names.add(f"layers.{i}.{module}.bias")
    return names


@pytest.mark.parametrize("family", list(TINY))
def test_state_dict_names(family):
    ours = Transformer(ModelConfig(**SIZES, **TINY[family][0]))
    assert set(ours.state_dict()) == expected_names(family)


def hf_weights_in_our_names(hf_state: dict[str, torch.Tensor], family: str, n_head: int) -> dict[str, torch.Tensor]:
    """A test-only name map from the Hugging Face layouts to ours (the real one lives in lit_open.checkpoint)."""
    if family == "gpt_neox":
        renames = {
            "gpt_neox.embed_in": "tok_embeddings",
            "gpt_neox.final_layer_norm": "norm",
            "lm_head": "output",  # `embed_out` before transformers 5
            "gpt_neox.layers": "layers",
            "input_layernorm": "attention_norm",
            "post_attention_layernorm": "ffn_norm",
            "attention.dense": "attention.wo",
            "mlp.dense_h_to_4h": "feed_forward.w1",
            "mlp.dense_4h_to_h": "feed_forward.w2",
        }
    else:
        renames = {
            "model.embed_tokens": "tok_embeddings",
            "model.norm": "norm",
            "lm_head": "output",
            "model.layers": "layers",
            "self_attn.q_proj": "attention.wq",
            "self_attn.k_proj": "attention.wk",
            "self_attn.v_proj": "attention.wv",
            "self_attn.o_proj": "attention.wo",
            "self_attn.q_norm": "attention.q_norm",
            "self_attn.k_norm": "attention.k_norm",
            "mlp.gate_proj": "feed_forward.w1",
            "mlp.up_proj": "feed_forward.w3",
            "mlp.down_proj": "feed_forward.w2",
        }
        if family == "olmo2":  # OLMo 2 norms the sublayer outputs
            renames |= {"post_attention_layernorm": "attention_norm", "post_feedforward_layernorm": "ffn_norm"}
        else:
            renames |= {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    out = {}
    for key, value in hf_state.items():
        if ".query_key_value." in key:  # fused, laid out per head as (head, q|k|v, head_dim)
            prefix, kind = key.replace("gpt_neox.layers", "layers").split(".attention.query_key_value.")
            parts = value.view(n_head, 3, -1, *value.shape[1:]).unbind(1)
            for proj, part in zip(("wq", "wk", "wv"), parts):
                out[f"{prefix}.attention.{proj}.{kind}"] = part.reshape(-1, *value.shape[1:])
            continue
        for old, new in renames.items():
            key = key.replace(old, new)
        out[key] = value
    return out


@pytest.mark.parametrize("family", list(TINY))
def test_logits_match_transformers(family):
    ours_kwargs, (arch, hf_kwargs) = TINY[family]
    torch.manual_seed(0)
    theirs = hf_model(arch, **HF_SIZES, **hf_kwargs).eval()
    # Random norm weights and biases too, so a misplaced norm cannot hide behind ones and zeros.
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 and (p == 1).all() else 0.0))
    ours = Transformer(ModelConfig(**SIZES, **ours_kwargs)).eval()
    ours.load_state_dict(hf_weights_in_our_names(theirs.state_dict(), family, n_head=4), strict=True)
    ids = torch.randint(0, 128, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=2e-5, rtol=1e-4)
