"""Hydra composition: recipes compose and validate, and bad input is refused at start-up with a clear message."""

from dataclasses import asdict

import pytest
import torch

from lit_open.compose import explicit_model_keys, group_options, load_command_config, load_train_config, to_yaml
from lit_open.errors import UserError
from lit_open.model import Transformer, num_parameters
from lit_open.plugin import build_plugins

RECIPES = [
    "quickstart",
    "olmo2_1b",
    "olmo2_7b",
    "amber_7b",
    "k2_65b",
    "pythia_160m",
    "k2_65b_long",
    "olmo2_7b_long",
]
EXPECTED_PARAMS = {  # equal to transformers' models (tests/parity/test_param_counts.py)
    "olmo2_1b": 1_484_916_736,
    "olmo2_7b": 7_298_617_344,
    "amber_7b": 6_738_415_616,
    "k2_65b": 65_286_184_960,
    "pythia_160m": 162_322_944,
}


def test_the_shipped_recipes_are_the_documented_ones():
    assert set(RECIPES) <= set(group_options("recipe"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_validates_and_builds_on_meta(recipe):
    cfg = load_train_config([f"recipe={recipe}"])
    assert cfg.run.recipe == recipe and cfg.run.name == recipe
    assert cfg.data.global_batch_size % cfg.data.micro_batch_size == 0
    assert cfg.data.seq_len <= cfg.model.max_seq_len
    with torch.device("meta"):
        model = Transformer(cfg.model)
    assert all(p.is_meta for p in model.parameters())
    if recipe in EXPECTED_PARAMS:
        assert num_parameters(model) == EXPECTED_PARAMS[recipe]


def test_recipe_values_come_through_and_overrides_win():
    cfg = load_train_config(["recipe=olmo2_1b", "optim.lr=1e-4", "trainer.max_steps=10"])
    assert (cfg.model.qk_norm, cfg.model.norm_placement, cfg.model.rope_theta) == ("full", "post", 500000.0)
    assert (cfg.schedule.warmup_steps, cfg.data.seq_len, cfg.trainer.precision) == (4000, 4096, "bf16-mixed")
    assert (cfg.optim.lr, cfg.trainer.max_steps) == (1e-4, 10)
    assert cfg.optim.decay_norms and not cfg.optim.decay_embeddings


@pytest.mark.parametrize(
    "recipe,init_from,seq_len,rope_theta,batch,lr,schedule,steps,cp,document_mask",
    [
        # K2 stage 2 from the last stage-1 checkpoint: 69.3B tokens at stage 1's 4,177,920 tokens per step, at the
        # 8K context and RoPE base of LLM360/K2-Chat's config.json, 8-way TP x 4-way context parallelism
        ("k2_65b_long", "hf:LLM360/K2@ckpt_360", 8192, 500000.0, 510, 1.5e-5, ("constant", 0, None), 16588, 4, False),
        # OLMo 2 7B at 64K (OLMo-core OLMo2-7B-long-context.py): 64 x 64K tokens, lr 1e-5, cosine with 2000 warmup
        # steps to 10%, intra-document masks, 8-way context parallelism, theta unchanged
        (
            "olmo2_7b_long",
            "hf:allenai/OLMo-2-1124-7B",
            65536,
            500000.0,
            64,
            1e-5,
            ("cosine", 2000, 0.1),
            11921,
            8,
            True,
        ),
    ],
)
def test_long_context_recipes_compose_with_their_published_values(
    recipe, init_from, seq_len, rope_theta, batch, lr, schedule, steps, cp, document_mask
):
    cfg = load_train_config([f"recipe={recipe}"])
    assert cfg.init_from == init_from
    assert (cfg.data.seq_len, cfg.model.max_seq_len, cfg.model.rope_theta) == (seq_len, seq_len, rope_theta)
    assert (cfg.data.global_batch_size, cfg.data.micro_batch_size) == (batch, 1)
    assert cfg.optim.lr == lr and cfg.trainer.max_steps == steps and cfg.schedule.total_steps is None
    name, warmup, min_lr_ratio = schedule
    assert (cfg.schedule.name, cfg.schedule.warmup_steps) == (name, warmup)
    assert min_lr_ratio is None or cfg.schedule.min_lr_ratio == min_lr_ratio
    assert (cfg.strategy.context_parallel_size, cfg.data.document_mask) == (cp, document_mask)
    assert cfg.data.seq_len % (2 * cp) == 0
    # the stage keys in the recipe's body replace those of init_from's config.json (2048 / 4096 positions)
    assert {"model.max_seq_len", "model.rope_theta"} <= explicit_model_keys([f"recipe={recipe}"])
    # overrides still win (e.g. K2's stage 2 at its released 2048-token context)
    released = load_train_config(
        [f"recipe={recipe}", "data.seq_len=2048", "model.max_seq_len=2048", "strategy.context_parallel_size=1"]
    )
    assert (released.data.seq_len, released.strategy.context_parallel_size) == (2048, 1)


@pytest.mark.parametrize("recipe", ["olmo2_1b", "olmo2_7b"])
def test_olmo2_recipes_train_with_the_stability_plugins(recipe):
    cfg = load_train_config([f"recipe={recipe}"])
    plugins = build_plugins(cfg.plugins)
    assert [p.name for p in plugins] == ["z_loss", "qk_norm", "spike_rollback", "nan_guard", "gc", "monitor"]
    assert plugins[0].cfg.coefficient == 1e-5  # OLMo 2's z-loss weight
    qk_norm = plugins[1]
    assert qk_norm.configure_model(cfg.model) is cfg.model and not qk_norm.inserted  # QK-norm is OLMo 2's own
    # plugins=[...] replaces the recipe's selection; the recipe's z_loss settings then select nothing
    assert [p.name for p in build_plugins(load_train_config([f"recipe={recipe}", "plugins=[gc]"]).plugins)] == ["gc"]


def test_model_presets_resolve_derived_fields_from_their_own_sizes():
    # regression: head_dim/n_kv_head must come from the preset, not from the dataclass's default sizes
    cfg = load_train_config([])
    assert (cfg.model.d_model, cfg.model.head_dim, cfg.model.n_kv_head) == (192, 48, 4)
    cfg = load_train_config(["model=pythia_160m"])
    assert (cfg.model.head_dim, cfg.model.rotary_dim) == (64, 16)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["recipe=olmo3"], ["Unknown recipe 'olmo3'", "olmo2_1b", "lit-open list recipes"]),
        (["model=llama9"], ["Unknown model preset 'llama9'", "pythia_160m"]),
        (["optim.lrr=1"], ["Unknown config key 'optim.lrr'", "lr", "weight_decay"]),
        (["plugins.monitr.x=1"], ["Unknown plugin 'monitr'", "monitor", "spike_rollback"]),
        (["plugins=[monitor]", "plugins.monitor.evry=5"], ["Unknown option 'evry' of plugin", "every_n_steps"]),
        (["plugins.monitor.every_n_steps=5"], ["which this run does not select", "+plugins=monitor"]),
        (["+optim.lrr=1"], ["Unknown config key 'optim.lrr'", "grad_clip"]),
        (["optim.lr=fast"], ["optim.lr", "'fast'", "float"]),
        (["trainer.max_steps=1.5"], ["trainer.max_steps", "int"]),
        (["trainer.precision=16-mixed"], ["trainer.precision", "bf16-mixed"]),
        (["schedule=exponential"], ["Unknown LR schedule 'exponential'", "cosine", "wsd"]),
        (["data.sources=[{path:/x,wieght:2}]"], ["Unknown config key 'wieght'", "path, weight"]),
        (["model.n_kv_head=3"], ["model.n_head=4", "model.n_kv_head=3"]),
        (["data.seq_len=4096"], ["data.seq_len=4096", "model.max_seq_len"]),
        (["data.global_batch_size=20"], ["data.global_batch_size=20", "micro_batch_size"]),
        (["trainer.max_steps"], ["Bad override", "trainer.max_steps"]),
    ],
)
def test_bad_input_names_the_problem_and_what_is_accepted(overrides, expected):
    with pytest.raises(UserError) as err:
        load_train_config(overrides)
    for fragment in expected:
        assert fragment in str(err.value)


def test_selecting_an_unknown_plugin_is_refused():
    expected = "Unknown plugin 'nope'" if group_options("plugins") else "No plugins are installed"
    with pytest.raises(UserError, match=expected):
        load_train_config(["plugins=[nope]"])


def test_saved_config_reproduces_the_run(tmp_path):
    cfg = load_train_config(["recipe=pythia_160m", "optim.lr=1e-3", "data.sources=[{path:/d,weight:2}]"])
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg))
    again = load_train_config([], config_file=saved)
    assert asdict(again) == asdict(cfg)
    changed = load_train_config(["trainer.max_steps=7"], config_file=saved)
    assert changed.trainer.max_steps == 7 and changed.optim.lr == 1e-3


def test_prepare_config_from_overrides():
    cfg = load_command_config("prepare", ["inputs=[a.jsonl,b/]", "output=out", "val_fraction=0.01"])
    assert (cfg.inputs, cfg.output, cfg.val_fraction, cfg.tokenizer) == (["a.jsonl", "b/"], "out", 0.01, None)
    with pytest.raises(UserError, match="Unknown config key 'ouput'"):
        load_command_config("prepare", ["ouput=x"])


def test_installed_plugins_are_selectable_by_name(monkeypatch):
    import lit_open.compose as compose

    monkeypatch.setattr(compose, "plugin_entry_points", lambda: {"recorder": "plugins_for_tests.Recorder"})
    cfg = load_train_config(["plugins=[recorder]"])
    # registered from its Config dataclass, like the built-in plugins: every option with its default
    assert cfg.plugins == {
        "recorder": {"_target_": "plugins_for_tests.Recorder", "skip_at": [], "extra_loss": 0.0, "qk_norm": None}
    }
    cfg = load_train_config(["plugins=[recorder]", "+plugins.recorder.skip_at=[3]"])
    assert cfg.plugins["recorder"]["skip_at"] == [3]
