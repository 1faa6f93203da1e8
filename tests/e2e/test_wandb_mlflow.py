"""Weights & Biases (offline) and MLflow (local store) through the CLI: every metrics.csv row and every event reaches
them, their steps stay monotonic through a rollback, and `lit-open logs sync` replays a run exactly once."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from pathlib import Path

import pytest
from conftest import cli_here, read_metrics, run_cli, tiny_overrides

from lit_open.train.events import read_events
from lit_open.train.loggers import OPTIMIZER_STEP

mlflow = pytest.importorskip("mlflow")
wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

UNIT_TESTS = Path(__file__).resolve().parents[1] / "unit"  # plugins_for_tests.py
ROLLBACK = {  # update 5 is not applied: back to step 2, then steps 3-8 again on later data
    "+plugins.rollback_at._target_": "plugins_for_tests.RollbackAt",
    "+plugins.rollback_at.at": 5,
    "+plugins.rollback_at.to": 2,
}


def wandb_records(run_dir: Path) -> list:
    """The records of every offline W&B run file under run_dir (W&B's LevelDB-style log: 32 KiB blocks of
    checksum, length, type; after a 7-byte ':W&B' header), parsed as W&B's protobuf `Record`s."""
    records = []
    for path in sorted(run_dir.glob("**/offline-run-*/run-*.wandb")):
        raw, pos, pieces = path.read_bytes(), 7, b""
        while pos + 7 <= len(raw):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
            if kind == 0 and length == 0:
                pos += 32768 - pos % 32768
                continue
            data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
            pieces = data if kind in (1, 2) else pieces + data  # full, first | middle, last
            if kind in (1, 4):
                record = wandb_pb.Record()
                record.ParseFromString(pieces)
                records.append(record)
    return records


def wandb_history(run_dir: Path, tables: bool | None = False) -> list[dict]:
    """The logged rows in the order logged (tables=True: the events tables' rows instead; None: both)."""
    rows = []
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
            if tables is None or tables == ("events/nrows" in row):
                rows.append(row)
    return rows


def csv_rows(run_dir: Path) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in row.items() if v != ""} for row in read_metrics(run_dir)]


def as_logged(row: dict) -> dict[str, float]:
    """A logger's row as a metrics.csv row: `trainer/global_step` is the CSV's `step`; W&B's own keys dropped."""
    out = {k: float(v) for k, v in row.items() if not k.startswith("_") and k != "events"}
    out["step"] = out.pop(OPTIMIZER_STEP)
    return out


def same_rows(logged: list[dict], expected: list[dict]) -> bool:
    close = [
        a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-6) for k in a)
        for a, b in zip(logged, expected)
    ]
    return len(logged) == len(expected) and all(close)


@pytest.fixture(scope="module")
def logged_run(tiny_data, tmp_path_factory) -> Path:
    """8 steps with a rollback from step 5 to 2, logged to CSV, W&B offline and MLflow."""
    run_dir = tmp_path_factory.mktemp("logged") / "run"
    overrides = tiny_overrides(
        tiny_data,
        run_dir,
        **ROLLBACK,
        **{"trainer.max_steps": 8, "logger": "[csv,wandb,mlflow]", "logger.wandb.mode": "offline"},
    )
    env = {"PYTHONPATH": str(UNIT_TESTS), "WANDB_SILENT": "true"}
    result = run_cli("train", *overrides, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_wandb_offline_history_holds_every_csv_row_with_monotonic_steps_through_a_rollback(logged_run):
    rows = csv_rows(logged_run)
    steps = [int(r["step"]) for r in rows if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 3, 4, 5, 6, 7, 8]  # the rollback repeated steps 3 and 4
    history = wandb_history(logged_run)
    assert same_rows([as_logged(h) for h in history], rows)
    logger_steps = [h["_step"] for h in wandb_history(logged_run, tables=None)]
    assert logger_steps == list(range(len(logger_steps)))  # W&B's own step: each row the next, events tables too


def test_wandb_gets_the_config_the_events_table_and_alerts(logged_run):
    records = wandb_records(logged_run)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for run in runs for item in run.config.update}
    assert config["optim"]["lr"] == pytest.approx(1e-2) and config["run"]["dir"] == str(logged_run)
    assert config["lit_open"]["version"] and "git_commit" in config["lit_open"]
    alerts = [r.alert.title for r in records if r.WhichOneof("record_type") == "alert"]
    assert alerts == ["rollback at step 2"]
    tables = wandb_history(logged_run, tables=True)
    assert tables[-1]["events/nrows"] == len(read_events(logged_run / "events.jsonl"))


def test_mlflow_holds_every_csv_row_the_events_and_the_config(logged_run):
    uri = f"sqlite:///{logged_run / 'logs' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["lit-open"], output_format="list")
    client = mlflow.MlflowClient(uri)
    rows = csv_rows(logged_run)
    keys = {k for r in rows for k in r if k != "step"} | {OPTIMIZER_STEP}
    by_step: dict[int, dict[str, float]] = {}
    for key in keys:
        for m in client.get_metric_history(run.info.run_id, key):
            by_step.setdefault(m.step, {})[key] = m.value
    # one MLflow step per optimizer step logged, in order; a repeated optimizer step gets a new MLflow step
    logged = [as_logged(by_step[s]) for s in sorted(by_step)]
    expected: list[dict] = []
    for row in rows:  # rows of one step (a train row, then a validation's) share an MLflow step
        if expected and expected[-1]["step"] == row["step"]:
            expected[-1].update(row)
        else:
            expected.append(dict(row))
    assert same_rows(logged, expected)
    events = client.download_artifacts(run.info.run_id, "events.jsonl", str(logged_run / "dl"))
    assert read_events(events) == read_events(logged_run / "events.jsonl")
    assert run.data.params["optim/lr"] == "0.01" and run.data.params["run/recipe"] == "quickstart"


def test_logs_sync_twice_replays_each_row_and_event_once(logged_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"  # a copy without the run's own W&B / MLflow logs
    (run_dir / "logs").mkdir(parents=True)
    for name in ("config.yaml", "events.jsonl", "logs/metrics.csv"):
        (run_dir / name).write_bytes((logged_run / name).read_bytes())
    monkeypatch.setenv("WANDB_SILENT", "true")
    for attempt in range(2):  # in this process, as the console script runs it
        for to in ("to=wandb", "to=mlflow"):
            result = cli_here("logs", "sync", f"run.dir={run_dir}", to, "mode=offline")
            assert result.returncode == 0, result.stderr[-3000:]
            assert ("nothing new" in result.stderr) == (attempt == 1), result.stderr
    history = wandb_history(run_dir)
    assert same_rows([as_logged(h) for h in history], csv_rows(run_dir))
    tables = wandb_history(run_dir, tables=True)
    assert [t["events/nrows"] for t in tables] == [len(read_events(run_dir / "events.jsonl"))]
    uri = f"sqlite:///{run_dir / 'logs' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["lit-open"], output_format="list")
    history = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "train/loss")
    losses = [r["train/loss"] for r in csv_rows(run_dir) if "train/loss" in r]
    assert [m.value for m in history] == pytest.approx(losses)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["logger=nope"], "Unknown logger preset 'nope' (logger=nope). Available: csv, default, mlflow, wandb."),
        (["logger=wandb"], "no W&B API key is configured"),
        (["logger.wandb.mode=offline"], "Turn it on first with logger=wandb"),
        (["logger=wandb", "logger.wandb.mode=cloud"], "logger.wandb.mode='cloud' is not supported"),
    ],
)
def test_bad_logger_input_exits_2_at_start_up(args, message, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))
    result = cli_here("train", f"run.dir={tmp_path / 'run'}", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "run" / "logs").exists()  # nothing started


@pytest.mark.parametrize(("args", "extra"), [(["logger=wandb"], "wandb"), (["logger=mlflow"], "mlflow")])
def test_a_logger_whose_package_is_missing_names_the_extra(args, extra, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == extra else real(name, *a))
    result = cli_here("train", f"run.dir={tmp_path / 'run'}", *args)
    assert result.returncode == 2 and f"pip install 'lit-open[{extra}]'" in result.stderr, result.stderr


def test_logs_sync_bad_input_exits_2(tmp_path):
    result = cli_here("logs", "sync", f"run.dir={tmp_path}", "to=neptune")
    assert result.returncode == 2 and "to='neptune'" in result.stderr and "wandb, mlflow" in result.stderr
    result = cli_here("logs", "sync", f"run.dir={tmp_path}", "to=mlflow")
    assert result.returncode == 2 and "metrics.csv" in result.stderr
    result = cli_here("logs", "push", f"run.dir={tmp_path}")
    assert result.returncode == 2 and "sync" in result.stderr
