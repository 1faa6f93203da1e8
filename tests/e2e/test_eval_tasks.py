"""lm-eval benchmarks as a user runs them: in the training loop (plugins=[lm_eval]) and offline (`lit-open eval
checkpoint=... tasks=[...]`) on the run's checkpoint and on its Hugging Face export, with the same numbers."""

from __future__ import annotations

import json
import math

import pytest
from conftest import cli_here, read_metrics, run_cli, tiny_overrides
from lm_eval_tasks import write_local_tasks

from lit_open.train.events import read_events

pytestmark = pytest.mark.slow

METRICS = (
    "eval/next_line/acc",
    "eval/next_line/acc_norm",
    "eval/corpus_ppl/bits_per_byte",
    "eval/line_end/exact_match",
)


def test_in_loop_and_offline_lm_eval_agree(tiny_data, tmp_path):
    tasks = write_local_tasks(tiny_data.parent / "corpus", tmp_path / "tasks", generation=True)
    run_dir = tmp_path / "run"
    lm_eval = {
        "plugins": "[lm_eval]",
        "plugins.lm_eval.tasks": f"[{tasks}]",
        "plugins.lm_eval.every_n_steps": 3,
        "plugins.lm_eval.at_start": "true",
        "plugins.lm_eval.limit": 8,
    }
    result = run_cli("train", *tiny_overrides(tiny_data, run_dir, **lm_eval))
    assert result.returncode == 0, result.stderr[-3000:]

    rows = {int(r["step"]): r for r in read_metrics(run_dir) if r.get("eval/next_line/acc")}
    assert sorted(rows) == [0, 3, 6]  # at the start, every 3 steps; the end (step 6) is not evaluated twice
    in_loop = {step: {k: float(rows[step][k]) for k in METRICS} for step in rows}
    assert all(0.0 <= v <= 1.0 for k, v in in_loop[6].items() if "bits_per_byte" not in k)
    assert in_loop[3]["eval/corpus_ppl/bits_per_byte"] != in_loop[6]["eval/corpus_ppl/bits_per_byte"]
    events = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "eval"]
    assert [e["step"] for e in events] == [0, 3, 6]
    assert {k: events[2]["results"][k] for k in METRICS} == pytest.approx(in_loop[6]) and events[2]["seconds"] > 0

    checkpoint = run_dir / "checkpoints" / "step-00000006.ckpt"
    out = tmp_path / "offline.json"
    result = run_cli("eval", f"checkpoint={checkpoint}", f"tasks=[{tasks}]", "limit=8", f"out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    offline = json.loads(out.read_text())
    assert offline["step"] == 6
    for key in METRICS:
        assert math.isclose(offline["metrics"][key], in_loop[6][key], rel_tol=1e-5, abs_tol=1e-9), key

    export = tmp_path / "hf"
    assert run_cli("convert", f"source={checkpoint}", f"out={export}").returncode == 0
    out = tmp_path / "offline-hf.json"
    result = run_cli("eval", f"checkpoint=hf:{export}", f"tasks=[{tasks}]", "limit=8", f"out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    from_hf = json.loads(out.read_text())
    assert from_hf["step"] == 6
    for key in METRICS:
        assert math.isclose(from_hf["metrics"][key], in_loop[6][key], rel_tol=1e-5, abs_tol=1e-9), key

    # lm-eval's own Hugging Face runner takes the export as is (`lm_eval --model hf --model_args pretrained=DIR`):
    # its tokenizer (and end-of-document token) come from the export's files, and the scores are the same
    from lm_eval.models.huggingface import HFLM

    from lit_open.eval.harness import load_tasks, resolve_tasks, run_tasks

    runner = HFLM(pretrained=str(export), device="cpu", dtype="float32", batch_size=8)
    theirs = run_tasks(runner, load_tasks(resolve_tasks([str(tasks)])), limit=8).metrics
    for key in METRICS[:3]:  # the scored tasks (greedy generation is transformers' own loop)
        assert math.isclose(theirs[key], in_loop[6][key], rel_tol=1e-4, abs_tol=1e-6), (key, theirs[key])


def test_eval_tasks_user_errors(tiny_data, tmp_path):
    missing = tmp_path / "no-such-tasks"
    result = cli_here("eval", f"checkpoint=hf:{tmp_path}", f"tasks=[{missing}]")
    assert result.returncode == 2 and f"tasks: '{missing}' does not exist" in result.stderr, result.stderr
    result = cli_here("eval", f"checkpoint={tmp_path / 'x.ckpt'}", "tasks=[hellaswag]", "limit=zero")
    assert result.returncode == 2 and "limit='zero' must be a whole number" in result.stderr

    run_dir = tmp_path / "run"
    bad = {"plugins": "[lm_eval]", "plugins.lm_eval.tasks": f"[{missing}]", "trainer.max_steps": 1}
    result = run_cli("train", *tiny_overrides(tiny_data, run_dir, **bad))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "plugins.lm_eval.tasks" in result.stderr and str(missing) in result.stderr
