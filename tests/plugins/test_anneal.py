"""anneal: the LR of every update, the data sources after the switch, the averaged weights, resume, bad options."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import Crash, CrashAfterStep, bind_run, read_metrics, tiny_overrides
from safetensors.torch import load_file

from lit_open.compose import load_train_config
from lit_open.config import TrainConfig
from lit_open.errors import UserError
from lit_open.plugins.anneal import Anneal
from lit_open.train import run
from lit_open.train.events import read_events
from lit_open.train.optim import lr_factor

PEAK_LR = 1e-2


def rows_by_step(run_dir) -> dict[int, dict[str, str]]:
    """The last metrics row of each step that has train/loss (a resumed run logs its steps again)."""
    return {int(r["step"]): r for r in read_metrics(run_dir) if r["train/loss"]}


@pytest.mark.slow
def test_lr_decays_to_zero_data_switches_soup_averages_and_resume_repeats(tiny_data, tmp_path, monkeypatch):
    import lit_open.train.runner as train_module

    anneal = [
        "plugins=[anneal]",
        "plugins.anneal.start_step=6",
        "plugins.anneal.steps=4",
        f"plugins.anneal.sources=[{{path:{tiny_data}/val}}]",  # the "high-quality" mix: another prepared source
        "plugins.anneal.soup_last=3",
        "plugins.anneal.soup_dtype=float32",
    ]
    options = {
        "trainer.max_steps": 12,
        "checkpoint.every_n_steps": 2,
        "checkpoint.keep_last": 0,
        "trainer.validate_at_start": "false",
        "trainer.val_check_interval": 0,
        "logger.tensorboard": "false",
    }

    def train(name: str) -> None:
        run(load_train_config([*tiny_overrides(tiny_data, tmp_path / name, **options), *anneal]))

    train("whole")
    real_build = train_module.build_plugins
    monkeypatch.setattr(train_module, "build_plugins", lambda cfg: [*real_build(cfg), CrashAfterStep(9)])
    with pytest.raises(Crash):
        train("split")  # mid-anneal; the newest checkpoint is step 8's
    monkeypatch.setattr(train_module, "build_plugins", real_build)
    train("split")  # resume=auto from step 8

    whole = tmp_path / "whole"
    rows = rows_by_step(whole)
    cfg = load_train_config(tiny_overrides(tiny_data, whole, **options))
    scheduled = {s: PEAK_LR * lr_factor(s, cfg.schedule, 12) for s in range(1, 13)}
    lr0 = scheduled[7]  # the schedule's LR for the anneal's first update
    expected = {**{s: scheduled[s] for s in range(1, 7)}, 7: lr0, 8: 0.75 * lr0, 9: 0.5 * lr0, 10: 0.25 * lr0}
    expected.update({11: 0.0, 12: 0.0})
    assert sorted(rows) == list(range(1, 13))
    for step, lr in expected.items():
        assert float(rows[step]["train/lr"]) == pytest.approx(lr, rel=1e-6, abs=1e-12), step

    # data: global batches 0-5 from data.sources (id 0), 6-11 only from the anneal's source (id 1)
    sources = json.loads((whole / "data_sequence" / "sources.json").read_text())
    assert [s["path"] for s in sources["sources"]] == [str((tiny_data / n).resolve()) for n in ("train", "val")]
    assert sources["phases"] == [
        {"data_step": 0, "sources": [0], "weights": [1.0]},
        {"data_step": 6, "sources": [1], "weights": [1.0]},
    ]
    log = [json.loads(line) for line in (whole / "data_sequence" / "00000000.jsonl").read_text().splitlines()]
    assert [e["data_step"] for e in log] == list(range(12))
    for entry in log:
        assert {source for source, _ in entry["samples"]} == ({0} if entry["data_step"] < 6 else {1})

    # soup: the mean of the anneal's last 3 checkpoints (steps 8, 10, 12), computed here from the files
    paths = [whole / "checkpoints" / f"step-{s:08d}.ckpt" for s in (8, 10, 12)]
    states = [torch.load(path, weights_only=False)["state_dict"] for path in paths]
    soup_dir = whole / "hf" / "soup-step-00000012"
    exported = {}
    for shard in soup_dir.glob("*.safetensors"):
        exported.update(load_file(shard))
    embed = sum(s["model.tok_embeddings.weight"] for s in states) / 3
    soup_embed = exported["model.embed_tokens.weight"]
    torch.testing.assert_close(soup_embed, embed[: soup_embed.shape[0]], rtol=0, atol=1e-6)
    assert not torch.equal(exported["model.embed_tokens.weight"], states[0]["model.tok_embeddings.weight"])
    meta = json.loads((soup_dir / "lit_open.json").read_text())
    assert meta["steps"] == [8, 10, 12] and meta["anneal"]["first_step"] == 7

    events = [e for e in read_events(whole / "events.jsonl") if e["event"] in ("anneal", "anneal_end", "soup")]
    assert [(e["event"], e["step"]) for e in events] == [("anneal", 7), ("anneal_end", 10), ("soup", 12)]
    assert events[0]["lr_start"] == pytest.approx(lr0) and events[0]["data_step"] == 6
    assert events[2]["steps"] == [8, 10, 12]

    # the resumed run repeats the uninterrupted one: same LRs and losses for the steps after the checkpoint
    split = rows_by_step(tmp_path / "split")
    for step in range(9, 13):
        assert float(split[step]["train/lr"]) == pytest.approx(float(rows[step]["train/lr"]), rel=1e-9, abs=1e-15)
        assert float(split[step]["train/loss"]) == pytest.approx(float(rows[step]["train/loss"]), rel=1e-6), step
    split_events = [e["event"] for e in read_events(tmp_path / "split" / "events.jsonl") if e["event"] == "anneal"]
    assert split_events == ["anneal"]  # announced once: the resumed session knew it from the checkpoint


def planned(max_steps: int = 100, **options) -> Anneal:
    config = TrainConfig()
    config = replace(config, trainer=replace(config.trainer, max_steps=max_steps))
    plugin = Anneal(**options)
    plugin.data_phases(config)
    return plugin


def test_start_tokens_round_up_to_whole_steps_and_steps_default_to_the_end():
    config = TrainConfig()
    tokens_per_step = config.data.global_batch_size * config.data.seq_len
    plugin = planned(start_tokens=10 * tokens_per_step + 1)
    assert (plugin.start, plugin.steps) == (11, 89)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"start_step": 3, "start_tokens": 10}, "both set"),
        ({"steps": 0}, "steps=0"),
        ({"start_step": -1}, "start_step=-1"),
        ({"sources": []}, "holds no source"),
        ({"soup_dtype": "int8"}, "soup_dtype='int8'"),
    ],
)
def test_bad_options_name_the_key(options, message):
    with pytest.raises(UserError, match=message):
        Anneal(**options)


def test_an_anneal_after_the_last_step_is_refused():
    with pytest.raises(UserError, match="start_step=100 is not before trainer.max_steps=100"):
        planned(start_step=100)


def test_a_soup_the_checkpoints_cannot_provide_is_refused_at_start():
    config = TrainConfig()
    config = replace(config, trainer=replace(config.trainer, max_steps=100))
    few = replace(config, checkpoint=replace(config.checkpoint, every_n_steps=50, keep_last=0))
    pruned = replace(config, checkpoint=replace(config.checkpoint, every_n_steps=10, keep_last=2))
    for run_config, message in ((few, "writes only 2 checkpoint"), (pruned, "checkpoint.keep_last=2")):
        plugin = Anneal(start_step=40, soup_last=3)
        bind_run(plugin, config=run_config)
        with pytest.raises(UserError, match=message):
            plugin.on_train_start(None, None)
