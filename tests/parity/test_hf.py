"""Hugging Face import/export (lit_open.checkpoint.hf) against transformers' own models.

Every reference is written by transformers: a tiny model of each family with random weights (norm weights and
biases too, so a swapped norm or a zero bias shows) saved with `save_pretrained`. Its logits are the expected ones
for `load_hf`; the directory `save_hf` writes must load in `transformers.AutoModelForCausalLM` and give them again,
hold the very tensors transformers wrote, and load back into lit-open bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lit_open
from lit_open.checkpoint import hf, hub
from lit_open.checkpoint.hf import load_hf, read_state_dict, save_hf
from lit_open.checkpoint.hf_config import DEFAULT_CONTEXT_LENGTH, EXPORT_ARCHITECTURES, hf_config, read_config
from lit_open.checkpoint.hf_weights import from_hf_state_dict, to_hf_state_dict
from lit_open.checkpoint.hub import resolve_source
from lit_open.errors import UserError
from lit_open.model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")

TOL = dict(atol=1e-4, rtol=1e-4)

# name -> (transformers config class, its kwargs, the lit-open family, what the lit-open config must say)
CASES = {
    "llama_gqa_untied": (
        "LlamaConfig",
        dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2),
        "llama",
        dict(n_kv_head=2, tie_embeddings=False, bias=False),
    ),
    "llama_mha_tied_odd": (
        "LlamaConfig",
        dict(
            vocab_size=101,
            hidden_size=48,
            intermediate_size=80,
            num_attention_heads=3,
            num_key_value_heads=3,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
        ),
        "llama",
        dict(n_head=3, n_kv_head=3, head_dim=16, tie_embeddings=True, norm_eps=1e-5, rope_theta=500000.0),
    ),
    "llama_bias_head_dim": (
        "LlamaConfig",
        dict(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=72,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=12,
            attention_bias=True,
            mlp_bias=True,
        ),
        "llama",
        dict(n_kv_head=1, head_dim=12, bias=True),
    ),
    "mistral_no_window": (
        "MistralConfig",
        dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=None,
        ),
        "llama",
        dict(n_kv_head=2),
    ),
    "olmo2_mha": (
        "Olmo2Config",
        dict(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            num_attention_heads=4,
            rms_norm_eps=1e-6,
            rope_theta=500000.0,
        ),
        "olmo2",
        dict(norm_placement="post", qk_norm="full", norm_eps=1e-6, rope_theta=500000.0),
    ),
    "olmo2_gqa_tied": (
        "Olmo2Config",
        dict(
            vocab_size=101,
            hidden_size=48,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
        "olmo2",
        dict(n_kv_head=2, tie_embeddings=True),
    ),
    "neox_rotary_quarter_parallel": (
        "GPTNeoXConfig",
        dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, rotary_pct=0.25),
        "gpt_neox",
        dict(rotary_fraction=0.25, parallel_residual=True, bias=True, norm="layernorm"),
    ),
    "neox_rotary_full_sequential_tied": (
        "GPTNeoXConfig",
        dict(
            vocab_size=101,
            hidden_size=48,
            intermediate_size=96,
            num_attention_heads=3,
            rotary_pct=1.0,
            rotary_emb_base=500.0,
            use_parallel_residual=False,
            tie_word_embeddings=True,
            layer_norm_eps=1e-6,
        ),
        "gpt_neox",
        dict(rotary_fraction=1.0, rope_theta=500.0, parallel_residual=False, tie_embeddings=True, norm_eps=1e-6),
    ),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values for every parameter: norm weights around 1, everything else (biases too) around 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1 and "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_((0.2 if param.ndim == 1 else 0.15) * noise)


def make_hf(directory: Path, case: str, dtype: torch.dtype = torch.float32):
    """A transformers model of `case` with random weights, saved to `directory`; returns it (eval, float32)."""
    config_class, kwargs, _, _ = CASES[case]
    config = getattr(transformers, config_class)(num_hidden_layers=2, max_position_embeddings=64, **kwargs)
    config.bos_token_id = config.eos_token_id = config.pad_token_id = None  # the defaults lie outside tiny vocabs
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomize(model)
    model.to(dtype).save_pretrained(directory)
    return model.float().eval()


def token_ids(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


@torch.no_grad()
def our_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    return model(ids)


def load_transformers(directory: Path):
    """transformers' model of `directory` in float32 (5.x would keep a bfloat16 checkpoint's dtype; 4.x widens)."""
    return transformers.AutoModelForCausalLM.from_pretrained(directory).float().eval()


def file_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor in the safetensors files of `directory`, as written."""
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("case", list(CASES))
def test_import_export_parity(tmp_path, case):
    _, kwargs, family, expected_config = CASES[case]
    reference = make_hf(tmp_path / "src", case)
    ids = token_ids(kwargs["vocab_size"])
    expected = hf_logits(reference, ids)

    # import: the config says what transformers built, and the logits are transformers'
    model = load_hf(tmp_path / "src")
    config = model.config
    assert config.family == family and config.n_layer == 2 and config.vocab_size == kwargs["vocab_size"]
    assert config.padded_vocab_size == kwargs["vocab_size"] and config.max_seq_len == 64
    assert {k: getattr(config, k) for k in expected_config} == expected_config
    if config.tie_embeddings:
        assert model.output.weight is model.tok_embeddings.weight
    torch.testing.assert_close(our_logits(model, ids), expected, **TOL)

    # export: transformers loads it and computes the same logits, from exactly the tensors it wrote itself
    out = save_hf(model, tmp_path / "out")
    exported = load_transformers(out)
    assert type(exported).__name__ == EXPORT_ARCHITECTURES[family][0]
    torch.testing.assert_close(hf_logits(exported, ids), expected, **TOL)
    assert_same_tensors(file_tensors(out), file_tensors(tmp_path / "src"))

    # import -> export -> import is exact
    again = load_hf(f"hf:{out}")
    assert again.config == dataclasses.replace(model.config, name="out")
    assert_same_tensors(again.state_dict(), model.state_dict())


def test_sharded_safetensors_both_ways(tmp_path):
    reference = make_hf(tmp_path / "x", "llama_gqa_untied")  # the float32 weights, for the logits
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / hub.SAFE_INDEX).read_text())
    assert len(set(index["weight_map"].values())) >= 3 and not (tmp_path / "sharded" / hub.SAFE_WEIGHTS).exists()
    ids = token_ids(128)
    model = load_hf(tmp_path / "sharded")
    torch.testing.assert_close(our_logits(model, ids), hf_logits(reference, ids), **TOL)

    out = save_hf(model, tmp_path / "out", max_shard_size=40_000)
    index = json.loads((out / hub.SAFE_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in file_tensors(out).values())
    torch.testing.assert_close(hf_logits(load_transformers(out), ids), hf_logits(reference, ids), **TOL)
    assert_same_tensors(load_hf(out).state_dict(), model.state_dict())


def test_pytorch_bin_single_and_sharded(tmp_path):
    """GPT-NeoX (fused qkv) from .bin files: transformers' in-memory names in one file, the on-disk names in two."""
    reference = make_hf(tmp_path / "src", "neox_rotary_quarter_parallel")
    ids = token_ids(128)
    expected = hf_logits(reference, ids)
    config_json = (tmp_path / "src" / hub.CONFIG_FILE).read_text()

    single = tmp_path / "single"
    single.mkdir()
    (single / hub.CONFIG_FILE).write_text(config_json)
    torch.save(reference.state_dict(), single / hub.BIN_WEIGHTS)
    torch.testing.assert_close(our_logits(load_hf(single), ids), expected, **TOL)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / hub.CONFIG_FILE).write_text(config_json)
    tensors = file_tensors(tmp_path / "src")
    names = list(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        filename = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({n: tensors[n] for n in part}, sharded / filename)
        weight_map.update(dict.fromkeys(part, filename))
    (sharded / hub.BIN_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = load_hf(sharded)
    torch.testing.assert_close(our_logits(model, ids), expected, **TOL)
    assert_same_tensors(model.state_dict(), load_hf(tmp_path / "src").state_dict())


def test_bfloat16_checkpoint(tmp_path):
    make_hf(tmp_path / "bf16", "olmo2_mha", dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in file_tensors(tmp_path / "bf16").values())
    ids = token_ids(128)

    kept = load_hf(tmp_path / "bf16")  # dtype None: as stored
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16} and kept.rope_cos.dtype == torch.bfloat16
    widened = load_hf(tmp_path / "bf16", dtype=torch.float32)
    assert {p.dtype for p in widened.parameters()} == {torch.float32}
    for name, tensor in widened.state_dict().items():
        assert torch.equal(tensor, kept.state_dict()[name].float()), name
    torch.testing.assert_close(our_logits(widened, ids), hf_logits(load_transformers(tmp_path / "bf16"), ids), **TOL)

    out = save_hf(kept, tmp_path / "out")  # bfloat16 stays bfloat16
    assert json.loads((out / hub.CONFIG_FILE).read_text())["torch_dtype"] == "bfloat16"
    assert_same_tensors(file_tensors(out), file_tensors(tmp_path / "bf16"))
    out = save_hf(widened, tmp_path / "out16", dtype=torch.bfloat16)  # or is cast on the way out
    assert_same_tensors(file_tensors(out), file_tensors(tmp_path / "bf16"))


def test_padded_vocab_exports_every_row(tmp_path):
    """A lit-open model with a padded embedding exports all its rows: transformers computes the same logits."""
    config = ModelConfig(
        name="padded",
        vocab_size=100,
        pad_vocab_multiple=64,
        n_layer=2,
        d_model=32,
        n_head=4,
        n_kv_head=2,
        d_ff=64,
        max_seq_len=32,
        init_std=0.1,
    )
    torch.manual_seed(0)
    model = Transformer(config).eval()
    out = save_hf(model, tmp_path / "out")
    assert json.loads((out / hub.CONFIG_FILE).read_text())["vocab_size"] == 128
    ids = token_ids(100)
    torch.testing.assert_close(hf_logits(load_transformers(out), ids), our_logits(model, ids), **TOL)
    again = load_hf(out)
    assert again.config.vocab_size == 128 and again.config.pad_vocab_multiple == 1
    assert_same_tensors(again.state_dict(), model.state_dict())


def test_state_dict_conversion_is_an_exact_inverse():
    config = ModelConfig(family="gpt_neox", vocab_size=50, pad_vocab_multiple=1, n_layer=2, d_model=24, n_head=3,
                         d_ff=48, max_seq_len=16, norm="layernorm", parallel_residual=True, mlp="gelu", bias=True,
                         rotary_fraction=0.25)  # fmt: skip
    state = {k: torch.randn(v.shape) for k, v in Transformer(config).state_dict().items()}
    hf_state = to_hf_state_dict(config, {f"model.{k}": v for k, v in state.items()})  # LitLM's prefix is stripped
    assert "gpt_neox.layers.1.attention.query_key_value.weight" in hf_state
    # the fused rows go head by head: [q_0 k_0 v_0 q_1 ...], 8 rows each
    fused = hf_state["gpt_neox.layers.0.attention.query_key_value.bias"]
    assert torch.equal(fused[8:16], state["layers.0.attention.wk.bias"][:8])
    assert torch.equal(fused[24:32], state["layers.0.attention.wq.bias"][8:16])
    assert_same_tensors(from_hf_state_dict(config, hf_state), state)


def test_source_resolution_and_exports(tmp_path):
    make_hf(tmp_path / "src", "llama_gqa_untied")
    assert resolve_source(f"hf:{tmp_path / 'src'}") == (tmp_path / "src", {})
    assert resolve_source(str(tmp_path / "src"))[0] == tmp_path / "src"
    assert lit_open.load_hf is load_hf and lit_open.save_hf is save_hf
    assert read_config(tmp_path / "src").name == "src"
    with pytest.raises(UserError, match="revision"):
        resolve_source(f"hf:{tmp_path / 'src'}", revision="main")


def test_hub_source_downloads_one_format_at_the_revision(tmp_path, monkeypatch):
    """The hub is stood in for: a snapshot laid out as huggingface_hub's cache lays it out."""
    import huggingface_hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--some-org--tiny" / "snapshots" / commit
    make_hf(snapshot, "neox_rotary_quarter_parallel")
    calls = []
    monkeypatch.setattr(
        huggingface_hub.HfApi, "list_repo_files", lambda self, repo, revision=None: ["model.safetensors", "x.bin"]
    )

    def snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False):
        calls.append((repo_id, revision, allow_patterns, local_files_only))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    directory, provenance = resolve_source("hf:some-org/tiny@step1000", revision="step2000")
    assert directory == snapshot
    assert provenance == {"repo": "some-org/tiny", "revision": "step2000", "commit": commit}
    repo, revision, patterns, offline = calls[0]
    assert (repo, revision, offline) == ("some-org/tiny", "step2000", False)
    assert {"config.json", "model*.safetensors", "model.safetensors.index.json", "tokenizer.json"} <= set(patterns)
    assert not any(p.endswith(".bin") for p in patterns)  # safetensors are there: no second copy as .bin
    model = load_hf("hf:some-org/tiny@step1000")
    assert model.config.name == "some-org/tiny" and calls[-1][1] == "step1000"


def test_save_is_atomic_and_carries_tokenizer_and_metadata(tmp_path):
    from tokenizers import Tokenizer, models

    make_hf(tmp_path / "src", "llama_gqa_untied")
    model = load_hf(tmp_path / "src")
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    vocab = {"<s>": 0, "</s>": 1, "<|endoftext|>": 2, "a": 3}
    Tokenizer(models.WordLevel(vocab, unk_token="a")).save(str(tokenizer_dir / "tokenizer.json"))
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))

    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier export")
    save_hf(model, out, tokenizer_dir=tokenizer_dir, metadata={"step": 7, "path": Path("/x")})
    assert not (out / "stale.txt").exists()  # replaced whole
    assert (out / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    assert json.loads((out / hf.METADATA_FILE).read_text()) == {"step": 7, "path": "/x"}
    config = json.loads((out / hub.CONFIG_FILE).read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
    assert json.loads((out / hub.GENERATION_CONFIG_FILE).read_text()) == {"bos_token_id": 0, "eos_token_id": 1}

    # a failed export leaves the previous one in place and no temporary directory behind
    state = model.state_dict()
    del state["layers.1.feed_forward.w3.weight"]
    with pytest.raises(UserError, match=r"missing layers\.1\.feed_forward\.w3\.weight"):
        save_hf(state, out, config=model.config)
    assert (out / hf.METADATA_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src", "tok"]
    with pytest.raises(UserError, match="config"):
        save_hf(model.state_dict(), tmp_path / "other")


def write_config(directory: Path, **config) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / hub.CONFIG_FILE).write_text(json.dumps(config))
    return directory


def test_unsupported_architecture(tmp_path):
    directory = write_config(tmp_path / "bert", architectures=["BertModel"], model_type="bert", hidden_size=8)
    with pytest.raises(UserError, match="BertModel") as err:
        load_hf(directory)
    assert "LlamaForCausalLM" in str(err.value) and "GPTNeoXForCausalLM" in str(err.value)


def test_missing_directory_and_files(tmp_path):
    for spec in (tmp_path / "nowhere", f"hf:{tmp_path / 'nowhere'}"):
        with pytest.raises(UserError, match="no such directory"):
            load_hf(spec)
    with pytest.raises(UserError, match=r"no config\.json"):
        read_config(tmp_path)
    make_hf(tmp_path / "src", "llama_gqa_untied")
    (tmp_path / "src" / hub.SAFE_WEIGHTS).unlink()
    with pytest.raises(UserError, match="no weights"):
        load_hf(tmp_path / "src")


def test_hub_source_while_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="hf:/path/to/dir") as err:
        resolve_source("hf:nobody/none@main")
    assert "nobody/none" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)


BASE = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (dict(architectures=["LlamaForCausalLM"], rope_scaling={"rope_type": "llama3", "factor": 8.0}), "llama3"),
        (dict(architectures=["LlamaForCausalLM"], rope_parameters={"rope_type": "linear", "factor": 2.0}), "linear"),
        (dict(architectures=["LlamaForCausalLM"], attention_bias=True), "mlp_bias=False"),
        (dict(architectures=["LlamaForCausalLM"], hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(architectures=["MistralForCausalLM"], sliding_window=8, max_position_embeddings=64), "sliding_window"),
        (dict(architectures=["Olmo2ForCausalLM"], attention_bias=True), "attention_bias"),
        (dict(architectures=["GPTNeoXForCausalLM"], hidden_act="gelu_new"), "gelu_new"),
        (dict(architectures=["GPTNeoXForCausalLM"], rotary_pct=0.1), "rotary"),
        (dict(architectures=["LlamaForCausalLM"], num_hidden_layers=None), "num_hidden_layers"),
    ],
)
def test_configs_refused(tmp_path, config, message):
    with pytest.raises(UserError, match=message):
        read_config(write_config(tmp_path, **{**BASE, **config}))


def test_tensor_mismatches_refused(tmp_path):
    make_hf(tmp_path / "src", "olmo2_mha")
    config = read_config(tmp_path / "src")
    tensors = file_tensors(tmp_path / "src")
    tensors["model.layers.0.self_attn.extra.weight"] = tensors.pop("model.layers.0.self_attn.q_norm.weight")
    with pytest.raises(UserError, match=r"missing model\.layers\.0\.self_attn\.q_norm\.weight.*unexpected model\."):
        from_hf_state_dict(config, tensors)
    wrong = {**vars(config), "d_ff": 80}
    with pytest.raises(UserError, match=r"mlp\.down_proj\.weight \(64, 96\) \(config\.json implies \(64, 80\)\)"):
        read_state_dict(tmp_path / "src", ModelConfig(**wrong))
    (tmp_path / "src" / hub.SAFE_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="Could not read the weights file"):
        load_hf(tmp_path / "src")


def test_export_refuses_what_the_family_cannot_express():
    config = ModelConfig(family="llama", vocab_size=32, n_layer=1, d_model=16, n_head=2, d_ff=32, qk_norm="full")
    with pytest.raises(UserError, match=r"model\.qk_norm='full' \(needs 'none'\)"):
        hf_config(config)
    neox = ModelConfig(family="gpt_neox", vocab_size=32, n_layer=1, d_model=16, n_head=2, n_kv_head=1, d_ff=32,
                       norm="layernorm", mlp="gelu", bias=True)  # fmt: skip
    with pytest.raises(UserError, match="no GQA"):
        to_hf_state_dict(neox, Transformer(neox).state_dict())


def test_a_config_without_a_context_length_as_olmo_core_writes_it(tmp_path):
    """OLMo-core's exporter writes max_position_embeddings -1 (allenai/OLMo-core, src/olmo_core/nn/hf/config.py,
    get_hf_config); transformers loads such a directory, and lit-open builds it for the context it is given."""
    reference = make_hf(tmp_path / "src", "olmo2_mha")
    path = tmp_path / "src" / hub.CONFIG_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), "max_position_embeddings": -1}))
    ids = token_ids(128)
    model = load_hf(tmp_path / "src", max_seq_len=32)
    assert model.config.max_seq_len == 32
    torch.testing.assert_close(our_logits(model, ids), hf_logits(reference, ids), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hf_logits(load_transformers(tmp_path / "src"), ids), hf_logits(reference, ids))
    assert load_hf(tmp_path / "src").config.max_seq_len == DEFAULT_CONTEXT_LENGTH
