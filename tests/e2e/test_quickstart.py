"""The README's main command: `lit-open train` prepares the standard-library data and trains on the CPU."""

import re

import pytest
from conftest import read_metrics, run_cli

from lit_open.compose import load_train_config


@pytest.mark.slow
def test_quickstart_trains_its_held_out_loss_falls_below_60_percent_and_its_benchmark_rises(tmp_path):
    result = run_cli("train", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "quickstart"
    rows = read_metrics(run_dir)
    val = [(int(r["step"]), float(r["val/loss"])) for r in rows if r["val/loss"]]
    first, last = val[0], val[-1]
    assert first[0] == 0 and last[0] == max(int(r["step"]) for r in rows)
    assert last[1] < 0.6 * first[1], val
    # the in-loop benchmark prepare built from held-out files: from chance (0.25 of 200 items) clearly upwards
    acc = [(int(r["step"]), float(r["eval/next_line/acc"])) for r in rows if r.get("eval/next_line/acc")]
    recipe = load_train_config([])  # the quickstart recipe: evaluated at the start and every N steps to the end
    every, steps = recipe.plugins["lm_eval"]["every_n_steps"], recipe.trainer.max_steps
    assert [step for step, _ in acc] == list(range(0, steps + 1, every))
    assert acc[0][1] < 0.35 and acc[-1][1] > 0.4 and acc[-1][1] > acc[0][1] + 0.1, acc
    summary = result.stderr[result.stderr.index("Done:") :]
    assert re.search(r"benchmark next_line/acc [\d.]+ -> [\d.]+", summary)
    assert re.search(r"held-out loss [\d.]+ -> [\d.]+", summary)
    assert "lit-open eval checkpoint=" in summary and "lit-open train --config" in summary
    assert (run_dir / "checkpoints" / "latest").exists() and (run_dir / "data_sequence" / "sources.json").exists()
