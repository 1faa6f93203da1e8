"""lm_eval: its options, when it evaluates, what it logs, and how it checks tasks before training starts.

The numbers themselves are tested against lm-eval's Hugging Face runner in tests/parity/test_lm_eval_hf.py, across
processes in tests/distributed/test_lm_eval_ranks.py and through the CLI in tests/e2e/test_eval_tasks.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import bind_run
from lm_eval_tasks import TINY_CONFIG, write_local_tasks

from lit_open.errors import UserError
from lit_open.eval.harness import resolve_tasks
from lit_open.model import Transformer
from lit_open.plugins.lm_eval import LMEval
from lit_open.train.events import read_events


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "plugins.lm_eval.tasks is empty"),
        ({"tasks": ["t"], "every_n_steps": -1}, "plugins.lm_eval.every_n_steps=-1"),
        ({"tasks": ["t"], "every_n_steps": 0, "at_end": False}, "evaluates nothing"),
        ({"tasks": ["t"], "limit": 0}, "plugins.lm_eval.limit=0"),
        ({"tasks": ["t"], "batch_size": 0}, "plugins.lm_eval.batch_size=0"),
        ({"tasks": ["t"], "num_fewshot": -1}, "plugins.lm_eval.num_fewshot=-1"),
        ({"tasks": ["t"], "every_n_step": 5}, "every_n_step"),
    ],
)
def test_bad_options_are_user_errors_naming_the_key(options, message):
    with pytest.raises(UserError, match=message):
        LMEval(**options)


def evaluated_steps(plugin: LMEval, last_step: int, max_steps: int, start: int = 0) -> list[int]:
    done, rows, in_rows = [], [], []
    plugin.task_dict = {"tasks": {}}
    plugin._prepare = lambda trainer, module: None  # tasks and model: see the tests below
    plugin.evaluate = lambda trainer, module: done.append(trainer.global_step) or {"eval/t/acc": 0.5}
    trainer = SimpleNamespace(global_step=start, max_steps=max_steps, is_global_zero=True, loggers=[])
    module = SimpleNamespace(last_metrics={}, log_row=rows.append)
    plugin.on_train_start(trainer, module)
    for step in range(start + 1, last_step + 1):
        trainer.global_step = step
        row = plugin.step_metrics(trainer, module)
        assert row == ({"eval/t/acc": 0.5} if done and done[-1] == step else {})
        in_rows += [step] if row else []
        plugin._last_step = done[-1] if done else -1
    plugin.on_train_end(trainer, module)
    # evaluations outside an update's metrics row (at the start, or at an early end) log a row of their own
    assert len(rows) == len(done) - len(in_rows), (done, in_rows)
    plugin.teardown(trainer, module, "fit")
    return done


def test_evaluates_every_n_steps_and_once_at_the_end():
    assert evaluated_steps(LMEval(tasks=["t"], every_n_steps=4), 10, max_steps=10) == [4, 8, 10]
    assert evaluated_steps(LMEval(tasks=["t"], every_n_steps=5), 10, max_steps=10) == [5, 10]
    assert evaluated_steps(LMEval(tasks=["t"], every_n_steps=0), 10, max_steps=10) == [10]
    assert evaluated_steps(LMEval(tasks=["t"], every_n_steps=4, at_end=False), 10, max_steps=10) == [4, 8]
    # training stopped early (time limit): the model it ended with is evaluated
    assert evaluated_steps(LMEval(tasks=["t"], every_n_steps=4), 7, max_steps=10) == [4, 7]
    # at_start: the model training starts from, in a fresh run only (a resumed one was evaluated before)
    assert evaluated_steps(LMEval(tasks=["t"], every_n_steps=4, at_start=True), 8, max_steps=8) == [0, 4, 8]
    assert evaluated_steps(LMEval(tasks=["t"], every_n_steps=4, at_start=True), 8, max_steps=8, start=4) == [8]


def test_local_task_paths_are_checked_and_data_files_resolved_next_to_the_yaml(tmp_path, monkeypatch):
    tasks = write_local_tasks(Path(__file__).resolve().parents[1] / "unit", tmp_path / "tasks", docs=4)
    monkeypatch.chdir(tmp_path)  # lm-eval alone would look for the data files here
    specs = resolve_tasks([str(tasks)])
    assert [s.name for s in specs] == ["corpus_ppl", "next_line"]
    for spec in specs:
        data_file = Path(spec.spec["dataset_kwargs"]["data_files"]["test"])
        assert data_file.is_absolute() and data_file.parent == tasks and data_file.is_file()
    assert [s.name for s in resolve_tasks([str(tasks / "next_line.yaml")])] == ["next_line"]
    with pytest.raises(UserError, match="'.*nowhere' does not exist"):
        resolve_tasks([str(tmp_path / "nowhere")], "plugins.lm_eval.tasks")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no lm-eval task config"):
        resolve_tasks([str(tmp_path / "empty")])


@pytest.mark.slow  # indexing lm-eval's ~15 000 bundled task configs takes 5-15 s
def test_unknown_task_names_fail_with_close_names():
    with pytest.raises(UserError, match="'hellaswagg' is not an lm-eval task.*Close names: hellaswag"):
        resolve_tasks(["hellaswagg"], "plugins.lm_eval.tasks")


@dataclass
class RunConfig:
    data: dict


def test_evaluation_goes_to_the_metrics_row_and_events_and_leaves_the_model_training(tiny_data, tmp_path):
    tasks = write_local_tasks(tiny_data.parent / "corpus", tmp_path / "tasks", docs=8, generation=True)
    model = Transformer(TINY_CONFIG)
    model.init_weights(seed=0)
    model.train()
    module = SimpleNamespace(model=model, device_mesh=None)
    trainer = SimpleNamespace(global_step=0, max_steps=4, is_global_zero=True, loggers=[], callbacks=[])
    plugin = LMEval(tasks=[str(tasks)], every_n_steps=2, limit=3, batch_size=4)
    bind_run(plugin, tmp_path, config=RunConfig(data={"tokenizer": str(tiny_data / "tokenizer.json")}))
    plugin.on_train_start(trainer, module)
    trainer.global_step = 1
    assert plugin.step_metrics(trainer, module) == {}
    trainer.global_step = 2
    row = plugin.step_metrics(trainer, module)
    assert set(row) >= {
        "eval/next_line/acc",
        "eval/next_line/acc_norm",
        "eval/corpus_ppl/bits_per_byte",
        "eval/corpus_ppl/word_perplexity",
        "eval/line_end/exact_match",
    }
    assert row["eval/next_line/acc"] in (0.0, 1 / 3, 2 / 3, 1.0)  # 3 documents
    assert row["eval/corpus_ppl/bits_per_byte"] > 0
    assert model.training  # put back in training mode
    (event,) = read_events(tmp_path / "events.jsonl")
    assert event["event"] == "eval" and event["step"] == 2 and event["plugin"] == "lm_eval"
    assert event["results"] == row and event["limit"] == 3 and event["seconds"] > 0
    json.dumps(event)  # plain floats
    plugin.teardown(trainer, module, "fit")


def test_a_task_with_fewer_documents_than_processes_fails_at_start(tiny_data, tmp_path, monkeypatch):
    tasks = write_local_tasks(tiny_data.parent / "corpus", tmp_path / "tasks", docs=4)
    module = SimpleNamespace(model=Transformer(TINY_CONFIG), device_mesh=None)
    plugin = LMEval(tasks=[str(tasks)], limit=1)
    bind_run(plugin, tmp_path, config=RunConfig(data={"tokenizer": str(tiny_data / "tokenizer.json")}))
    monkeypatch.setattr("lit_open.eval.harness.LitOpenLM.world_size", 2)
    with pytest.raises(UserError, match="task corpus_ppl has 1 documents to evaluate, fewer than the 2"):
        plugin.on_train_start(SimpleNamespace(global_step=0), module)


@pytest.mark.slow
def test_task_names_pass_through_to_lm_eval_and_missing_datasets_fail_at_load(tmp_path, monkeypatch):
    from lit_open.eval.harness import load_tasks

    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", tmp_path)  # an empty cache, and no hub:
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    (spec,) = resolve_tasks(["arc_easy"])
    assert spec.spec == "arc_easy"
    with pytest.raises(UserError, match="lm-eval could not load the tasks arc_easy.*HF_DATASETS_CACHE"):
        load_tasks([spec])
