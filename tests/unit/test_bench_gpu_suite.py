"""`python -m lit_open.bench gpu-suite`: its plan is complete and wired (checked here, without a GPU), its parts stop
at their deadline or are skipped when the budget or a package is missing, and its goals and report read the
benchmarks' own JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lit_open.bench import gpu_suite
from lit_open.bench.__main__ import main
from lit_open.bench.gpu_report import check_goals, markdown
from lit_open.errors import UserError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu-suite")
    report = main(["gpu-suite", "--dry-run", "--out", str(out)])
    assert json.loads((out / "gpu-suite.json").read_text()) == json.loads(json.dumps(report, default=str))
    return {part["name"]: part for part in report["results"]["plan"]}


def test_dry_run_plans_every_part_of_the_issue_in_order_of_importance(plan):
    assert list(plan) == ["tests", "throughput", "float8", "attention", "memory", "amber_7b", "fsdp"]
    assert plan["tests"]["starts_by_s"] == 0 and plan["tests"]["fits_budget"]
    for part in plan.values():
        assert part["command"] and part["checked"]


def test_dry_run_finds_the_gpu_marked_tests_of_every_gpu_path(plan):
    files = set(plan["tests"]["checked"]["test_files"])
    # attention kernels, float8 (parallel), adamw8bit (optim), QAT, lm-eval adapter, generate, context parallelism
    assert {
        "tests/parity/test_attention.py",
        "tests/unit/test_parallel.py",
        "tests/unit/test_optim.py",
        "tests/plugins/test_qat.py",
        "tests/unit/test_generate.py",
        "tests/distributed/test_context_parallel.py",
    } <= files
    assert any("lm_eval" in f for f in files)
    assert "-m gpu" in plan["tests"]["command"]


def test_dry_run_composes_every_training_config_the_parts_will_run(plan):
    runners = plan["throughput"]["checked"]["runners"]
    assert list(runners) == ["lightning", "bare", "bare_sync", "litgpt", "olmo_core"]
    assert all(
        v.startswith("olmo2_1b, micro-batch 4 x 4096, bf16-mixed, strategy auto") and "compile True" in v
        for v in runners.values()
    )
    float8 = plan["float8"]["checked"]["runners"]
    assert [v.split("float8 ")[1].split(",")[0] for v in float8.values()] == ["none", "tensorwise", "rowwise"]
    memory = plan["memory"]["checked"]["runners"]
    assert len(memory) == 9
    assert {(v.split("micro-batch ")[1].split(" x")[0], v.split("AC ")[1].split(",")[0]) for v in memory.values()} == {
        (mb, ac) for mb in ("4", "8", "16") for ac in ("none", "selective", "full")
    }
    (amber,) = plan["amber_7b"]["checked"]["runners"].values()
    assert "amber_7b" in amber and "AC full" in amber and "optimizer adamw8bit" in amber and "strategy auto" in amber
    fsdp = list(plan["fsdp"]["checked"]["runners"].values())
    assert ["strategy auto" in fsdp[0], "strategy fsdp" in fsdp[1]] == [True, True]
    assert "--dry-run" not in plan["attention"]["command"] and plan["attention"]["checked"]["options"]


def test_a_real_run_needs_a_gpu_and_bad_parts_are_user_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stopped:
        main(["gpu-suite", "--out", str(tmp_path)])
    assert stopped.value.code == 2
    with pytest.raises(UserError, match="--parts 'tests,nope': choose among tests, throughput"):
        gpu_suite.selected_parts("tests,nope")


def suite(tmp_path, budget: float, packages: dict) -> gpu_suite.Suite:
    s = gpu_suite.Suite(out=tmp_path, json_path=tmp_path / "gpu-suite.json", budget_s=budget)
    s.packages = packages
    return s


def test_a_part_is_stopped_at_its_deadline_and_parts_that_no_longer_fit_are_skipped(tmp_path, monkeypatch):
    sleeper = gpu_suite.Part("sleepy", "sleeps", ["x"], cap_s=1, min_s=0)
    monkeypatch.setattr(gpu_suite, "command", lambda part, path: [sys.executable, "-c", "import time; time.sleep(60)"])
    with (tmp_path / "log").open("w") as log:
        record = gpu_suite.run_part(sleeper, suite(tmp_path, 100, {}), tmp_path, log)
        assert (record["status"], record["exit_code"]) == ("stopped", None) and record["seconds"] < 10
        late = gpu_suite.Part("late", "needs a minute", ["x"], cap_s=60, min_s=60)
        assert gpu_suite.run_part(late, suite(tmp_path, 30, {}), tmp_path, log)["status"] == "skipped"
        needy = gpu_suite.Part("f8", "float8", ["x"], cap_s=60, min_s=1, needs=("torchao",))
        missing = {"torchao": {"ok": False, "error": "ModuleNotFoundError: No module named 'torchao'"}}
        record = gpu_suite.run_part(needy, suite(tmp_path, 100, missing), tmp_path, log)
        assert record["status"] == "skipped" and "No module named 'torchao'" in record["note"]


def test_a_failing_part_is_recorded_with_its_exit_code_and_output(tmp_path, monkeypatch):
    part = gpu_suite.Part("broken", "exits 3", ["x"], cap_s=30, min_s=0)
    monkeypatch.setattr(gpu_suite, "command", lambda p, path: [sys.executable, "-c", "print('out'); exit(3)"])
    with (tmp_path / "log").open("w") as log:
        record = gpu_suite.run_part(part, suite(tmp_path, 100, {}), tmp_path, log)
    assert (record["status"], record["exit_code"]) == ("failed", 3)
    assert "out" in (tmp_path / "log").read_text()


def throughput_result(runners: dict[str, list[float]], peaks: dict[str, float] | None = None) -> dict:
    return {
        "benchmark": "throughput",
        "config": {"model": "olmo2_1b", "micro_batch": 4, "seq_len": 4096, "precision": "bf16-mixed",
                   "schedule": "interleaved", "rounds": 3, "round_steps": 3, "warmup": 2},
        "results": {
            "reference": "bare",
            "lightning_overhead_pct": None,
            "runners": {
                label: {"status": "ok", "round_tokens_per_s": tps, "tokens_per_s": sorted(tps)[1], "mfu": 0.4,
                        "peak_memory_gib": 50.0, "peak_reserved_gib": (peaks or {}).get(label, 60.0),
                        "first_loss": 11.6, "loss": 11.0, "losses": [11.6, 11.0]}
                for label, tps in runners.items()
            },
        },
    }  # fmt: skip


def test_goals_are_per_round_ratios_and_peak_memory_against_80_gb(tmp_path):
    parts = [
        {"name": "throughput", "title": "t", "status": "ok",
         "result": throughput_result({"lightning": [100, 110, 90], "bare": [102, 112, 93], "litgpt": [80, 90, 100]})},
        {"name": "float8", "title": "f", "status": "ok",
         "result": throughput_result({"lightning": [100, 100, 100],
                                      "lightning+strategy.float8=tensorwise": [120, 130, 105]})},
        {"name": "amber_7b", "title": "a", "status": "ok",
         "result": throughput_result({"lightning": [1, 1, 1]}, {"lightning": 81.5})},
    ]  # fmt: skip
    litgpt, overhead, tensorwise, rowwise, micro_batch_16, amber = check_goals(parts)
    # per round: lightning / litgpt = 1.25, 1.222, 0.9; bare / lightning = 1.02, 1.018, 1.033
    assert (litgpt["measured"], litgpt["met"]) == (pytest.approx(110 / 90), True)
    assert (overhead["measured"], overhead["met"]) == (pytest.approx(2.0), True)
    assert (tensorwise["measured"], tensorwise["met"]) == (pytest.approx(1.2), True)
    assert rowwise["measured"] is None and rowwise["met"] is None  # not measured: neither met nor failed
    assert micro_batch_16["measured"] is None
    assert (amber["measured"], amber["met"]) == (81.5, False)  # 81.5 GiB reserved > 79

    report = {"date": "2026-12-04", "versions": {"lit_open": "0.1", "git_commit": "abc"}, "command": "x",
              "config": {"budget_s": 480}, "results": {"packages": {}, "parts": parts, "seconds": 1,
                                                       "goals": check_goals(parts)}}  # fmt: skip
    text = markdown(report)
    assert "| amber_7b full fine-tune, adamw8bit + full AC: peak reserved GiB (80 GB GPU) | <= 79.0 | 81.500 |" in text
    assert "`lightning+strategy.float8=tensorwise`" in text and "## float8: f" in text
