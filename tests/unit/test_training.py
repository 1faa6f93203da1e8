"""`lit_open.train.run` on a tiny model: the run directory, accumulation, precisions, plugin hooks, resume."""

import json

import numpy as np
import pytest
import torch
from conftest import read_metrics, tiny_overrides, train_losses

from lit_open.compose import load_train_config
from lit_open.data.order import DataOrder
from lit_open.data.sequence import read_data_sequence
from lit_open.train import run
from lit_open.train.events import read_events


def train(data, run_dir, **extra):
    return run(load_train_config(tiny_overrides(data, run_dir, **extra)))


def test_run_directory_has_every_promised_artifact(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    summary = train(tiny_data, run_dir)
    assert summary["steps"] == 6 and summary["tokens"] == 6 * 8 * 32
    assert (run_dir / "config.yaml").is_file()
    saved = load_train_config([], config_file=run_dir / "config.yaml")
    assert saved.trainer.max_steps == 6 and saved.run.dir == str(run_dir)

    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-00000003.ckpt", "step-00000006.ckpt"]
    assert (checkpoints / "latest").read_text().strip() == "step-00000006.ckpt"

    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if r["train/loss"]]
    assert [int(r["step"]) for r in train_rows] == [1, 2, 3, 4, 5, 6]
    for r in train_rows:
        assert float(r["train/tokens"]) == int(r["step"]) * 8 * 32
        assert float(r["train/grad_norm"]) > 0 and float(r["train/tokens_per_s"]) > 0 and float(r["train/lr"]) > 0
    assert [int(r["step"]) for r in rows if r["val/loss"]] == [0, 3, 6]
    assert float(train_rows[-1]["train/loss"]) < float(train_rows[0]["train/loss"])
    assert list(run_dir.joinpath("logs").glob("events.out.tfevents.*"))

    events = read_events(run_dir / "events.jsonl")
    assert events[0]["event"] == "start"
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [3, 6]

    # the data-sequence log names exactly the samples of the global order, step by step
    sequence = read_data_sequence(run_dir / "data_sequence")
    sources = json.loads((run_dir / "data_sequence" / "sources.json").read_text())["sources"]
    order = DataOrder([s["samples"] for s in sources], [s["weight"] for s in sources], 8, seed=1234)
    assert [e["data_step"] for e in sequence] == [0, 1, 2, 3, 4, 5]
    assert [e["step"] for e in sequence] == [1, 2, 3, 4, 5, 6]
    for entry in sequence:
        assert entry["samples"] == order.global_batch(entry["data_step"]).tolist()


def test_gradient_accumulation_equals_one_large_batch(tiny_data, tmp_path):
    train(tiny_data, tmp_path / "accum", **{"data.micro_batch_size": 2})  # 4 micro-batches per step
    train(tiny_data, tmp_path / "whole", **{"data.micro_batch_size": 8})
    a, b = train_losses(tmp_path / "accum"), train_losses(tmp_path / "whole")
    assert a.keys() == b.keys()
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5)


@pytest.mark.parametrize("precision,dtype", [("bf16-mixed", torch.float32), ("bf16-true", torch.bfloat16)])
def test_bf16_precisions_train(tiny_data, tmp_path, precision, dtype):
    run_dir = tmp_path / precision
    summary = train(tiny_data, run_dir, **{"trainer.precision": precision})
    assert np.isfinite(summary["train_loss_last"]) and summary["train_loss_last"] < summary["train_loss_first"]
    state = torch.load(run_dir / "checkpoints" / "step-00000006.ckpt", weights_only=False)["state_dict"]
    assert state["model.layers.0.attention.wq.weight"].dtype == dtype


def test_plugin_hooks_are_called_and_a_skipped_step_changes_nothing(tiny_data, tmp_path, monkeypatch):
    from plugins_for_tests import Recorder

    import lit_open.train.runner as train_module

    plugins = []

    def build(cfg):
        plugins.append(Recorder(skip_at=[2], extra_loss=0.1, qk_norm="head"))
        return plugins

    monkeypatch.setattr(train_module, "build_plugins", build)
    run_dir = tmp_path / "run"
    summary = train(tiny_data, run_dir)
    recorder = plugins[0]
    assert recorder.calls[:2] == ["configure_model", "on_model_built"]
    assert recorder.model.layers[0].attention.q_norm is not None  # configure_model changed the architecture
    assert recorder.unchanged_by_skip == [True]  # weights, bit for bit, across the skipped update
    # the skipped update consumed its batch but not an optimizer step: 7 batches for 6 steps
    assert summary["steps"] == 6 and len(read_data_sequence(run_dir / "data_sequence")) == 7
    rows = [r for r in read_metrics(run_dir) if r["train/loss"]]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]  # one row per update, none for the skipped one
    assert [float(r["train/skipped"]) for r in rows] == [0, 0, 1, 1, 1, 1]
    assert float(rows[2]["train/tokens"]) == 4 * 8 * 32  # update 3 came from the 4th batch: the 3rd was skipped
    assert all(float(r["train/extra"]) > 0 for r in rows)
    assert any(e["event"] == "skip" and e["plugin"] == "recorder" for e in read_events(run_dir / "events.jsonl"))


class Crash(Exception):
    pass


def test_a_crashed_run_resumes_and_repeats_the_uninterrupted_one(tiny_data, tmp_path, monkeypatch):
    import lit_open.train.runner as train_module
    from lit_open.plugin import Plugin

    class CrashAtStep(Plugin):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 5:
                raise Crash("injected")

    train(tiny_data, tmp_path / "full")
    real_build = train_module.build_plugins
    monkeypatch.setattr(train_module, "build_plugins", lambda cfg: [CrashAtStep()])
    with pytest.raises(Crash):
        train(tiny_data, tmp_path / "split")
    monkeypatch.setattr(train_module, "build_plugins", real_build)
    train(tiny_data, tmp_path / "split")  # resume=auto: from the step-3 checkpoint
    full, split = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert sorted(split) == [1, 2, 3, 4, 5, 6]  # history up to the checkpoint kept, replayed steps once
    for step in full:
        assert split[step] == pytest.approx(full[step], rel=1e-6)
    events = read_events(tmp_path / "split" / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "resume"] == [3]
    assert [e["data_step"] for e in read_data_sequence(tmp_path / "split" / "data_sequence")] == list(range(6))


def test_continuing_a_finished_run_records_what_changed(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_data, run_dir, **{"trainer.max_steps": 3})
    summary = run(load_train_config(["trainer.max_steps=5"], config_file=run_dir / "config.yaml"))
    assert summary["steps"] == 5 and summary["steps_this_session"] == 2
    resume = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "resume"]
    assert resume[0]["step"] == 3 and resume[0]["changed"] == {"trainer.max_steps": [3, 5]}


def test_sources_are_mixed_by_weight_in_every_global_batch(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    two = f"[{{path:{tiny_data}/train,weight:3}},{{path:{tiny_data}/val,weight:1}}]"
    train(tiny_data, run_dir, **{"data.sources": two, "trainer.max_steps": 4})
    for entry in read_data_sequence(run_dir / "data_sequence"):
        sources = [source for source, _ in entry["samples"]]
        assert sources.count(0) == 6 and sources.count(1) == 2  # 3:1 of a global batch of 8, in every batch


def test_document_mask_gives_batches_document_ids_at_eos(tiny_data, tmp_path):
    from lit_open.data.datamodule import DataModule
    from lit_open.data.manifest import read_manifest

    cfg = load_train_config(tiny_overrides(tiny_data, tmp_path / "run", **{"data.document_mask": "true"}))
    datamodule = DataModule(cfg.data, cfg.run.seed)
    datamodule.setup("fit")
    eos = read_manifest(tiny_data / "train")["tokenizer"]["eos_id"]
    spread = range(0, datamodule.train_sources[0].samples, 5)  # a fifth of the corpus: a dozen document ends
    loader = datamodule._loader(datamodule.train_sources, [[(0, i, 0, 0, 1) for i in spread]], workers=0)
    batch = next(iter(loader))
    ids, docs = batch["input_ids"], batch["doc_ids"]
    assert (ids == eos).any(), "the test corpus should pack several documents per sequence somewhere"
    for row, doc in zip(ids, docs):
        after_eos = torch.cat([torch.tensor([False]), row[:-1] == eos])
        assert torch.equal(doc.diff(), after_eos[1:].to(doc.dtype))  # a new document starts after each EOS
    summary = train(tiny_data, tmp_path / "run", **{"data.document_mask": "true"})
    assert summary["steps"] == 6 and summary["val_loss_last"] < summary["val_loss_first"]
