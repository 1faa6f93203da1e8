"""init_from a lit-open checkpoint, the architecture rules, and checkpoint retention (keep_last + keep_every)."""

from __future__ import annotations

import pytest
from conftest import read_metrics, tiny_overrides

from lit_open.checkpoint.resumable import CheckpointWriter, list_checkpoints
from lit_open.compose import load_train_config
from lit_open.errors import UserError
from lit_open.events import read_events
from lit_open.train import run


@pytest.fixture(scope="module")
def source_run(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("source") / "run"
    run(load_train_config(tiny_overrides(tiny_data, run_dir, **{"trainer.max_steps": 4})))
    return run_dir


def val_losses(run_dir) -> list[float]:
    return [float(r["val/loss"]) for r in read_metrics(run_dir) if r["val/loss"]]


def test_a_run_starts_from_the_weights_and_optimizer_state_of_a_lit_open_checkpoint(tiny_data, tmp_path, source_run):
    checkpoint = source_run / "checkpoints" / "step-00000004.ckpt"
    run_dir = tmp_path / "finetune"
    cfg = load_train_config(
        [*tiny_overrides(tiny_data, run_dir, **{"trainer.max_steps": 2}), f"init_from={checkpoint}"]
    )
    run(cfg)
    # the held-out loss before the first update is the source run's final one, to the last bit
    assert val_losses(run_dir)[0] == val_losses(source_run)[-1]
    (event,) = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "init_from"]
    assert event["kind"] == "lit_open" and event["source_step"] == 4 and event["optimizer_state"] == "loaded"
    assert f"init_from: {checkpoint}" in (run_dir / "config.yaml").read_text()
    # a resumed run continues from its own checkpoint, not from init_from again
    resumed = run(load_train_config([*tiny_overrides(tiny_data, run_dir, **{"trainer.max_steps": 3}),
                                     f"init_from={checkpoint}"]))  # fmt: skip
    assert resumed["steps"] == 3
    assert len([e for e in read_events(run_dir / "events.jsonl") if e["event"] == "init_from"]) == 1


def test_the_source_defines_the_architecture_and_an_explicit_conflict_is_refused(tiny_data, tmp_path, source_run):
    checkpoint = source_run / "checkpoints" / "step-00000004.ckpt"
    base = [o for o in tiny_overrides(tiny_data, tmp_path / "x") if not o.startswith("model.")]
    cfg = load_train_config([*base, f"init_from={checkpoint}"])  # the recipe's quickstart model is replaced
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.vocab_size) == (2, 64, 512)
    cfg = load_train_config([*base, f"init_from={checkpoint}", "model.attention=math"])  # not an architecture key
    assert cfg.model.attention == "math"
    with pytest.raises(UserError, match=r"model.n_layer=3 \(the source has 2\)"):
        load_train_config([*base, f"init_from={checkpoint}", "model.n_layer=3"])
    with pytest.raises(UserError, match="init_from='/nowhere.ckpt': no such checkpoint"):
        load_train_config([*base, "init_from=/nowhere.ckpt"])


def test_retention_keeps_the_last_k_plus_every_nth(tmp_path):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    writer = CheckpointWriter(directory, every_n_steps=1, keep_last=2, keep_every=5)
    for step in range(1, 13):
        (directory / f"step-{step:08d}.ckpt").write_text("x")
        writer._prune()
    assert [p.name[5:13] for p in list_checkpoints(directory)] == ["00000005", "00000010", "00000011", "00000012"]
    with pytest.raises(UserError, match="checkpoint.keep_every=-1"):
        load_train_config(["checkpoint.keep_every=-1"])


@pytest.mark.parametrize("recipe", ["amber_7b_continue", "olmo2_1b_midtrain", "pythia_160m_finetune"])
def test_fine_tuning_recipes_compose_and_say_how_to_work_offline(recipe, monkeypatch):
    cfg = load_train_config([f"recipe={recipe}", "init_from=null"])  # everything but the download
    assert cfg.run.name == recipe and cfg.trainer.max_steps > 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"Could not download hf:.*init_from=hf:/path/to/dir"):
        load_train_config([f"recipe={recipe}"])
