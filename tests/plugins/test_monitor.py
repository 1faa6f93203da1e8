"""The monitor plugin: which steps it logs, and each statistic against a value computed independently.

The fast tests train the tiny model of `tests/conftest.py` in-process with `plugins=[monitor]` next to a `Capture`
plugin that records, by its own means, what the monitor should report: the parameters after every update, AdamW's
states and block 0's output on the training micro-batches of each update. The slow ones run the monitor on several
processes (ddp, fsdp, tp, fsdp + tp on gloo) and on compiled, activation-checkpointed blocks against a plain
one-process run, and measure its overhead.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, tiny_overrides

import lit_open.train.runner as train_module
from lit_open.compose import load_train_config
from lit_open.errors import UserError
from lit_open.plugin import Plugin, build_plugins
from lit_open.plugins.monitor import Monitor, parameter_group

EVERY = 2
STEPS = 6
SKIPPED_DATA_STEP = 3  # its update would have been step 4, a monitored one: step 4 comes from the next batch
# the tiny model's parameter groups: its embeddings are tied (the quickstart preset's), so there is no `output`
GROUPS = ["layers.0", "layers.1", "tok_embeddings", "norm"]


class Capture(Plugin):
    """Records the parameters after each update (and at the start), the optimizer states and block 0's outputs."""

    name = "capture"

    def __init__(self) -> None:
        super().__init__()
        self.params: dict[int, dict[str, torch.Tensor]] = {}  # optimizer step -> parameters after it
        self.states: dict[int, dict[str, float]] = {}  # optimizer step -> squared norms of exp_avg, exp_avg_sq
        self.block0: dict[int, list[torch.Tensor]] = {}  # optimizer step -> block 0's outputs, micro-batch by micro
        self._outputs: list[torch.Tensor] = []
        self._training = False

    def on_model_built(self, model) -> None:
        model.layers[0].register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        if self._training:
            self._outputs.append(output.detach().clone())

    def on_train_start(self, trainer, pl_module) -> None:
        self.params[trainer.global_step] = self._parameters(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch["micro"] == 0:
            self._outputs = []  # a new global batch, also after a skipped update
        self._training = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._training = False
        step = trainer.global_step
        if batch["micro"] + 1 != batch["n_micro"] or step in self.params:  # mid-step, or the update was skipped
            return
        self.params[step] = self._parameters(pl_module)
        self.block0[step] = self._outputs
        optimizer = trainer.optimizers[0]
        self.states[step] = {
            key: sum(float(s[key].double().pow(2).sum()) for s in optimizer.state.values())
            for key in ("exp_avg", "exp_avg_sq")
        }

    @staticmethod
    def _parameters(pl_module) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in pl_module.model.named_parameters()}


class SkipOne(Plugin):
    name = "skip_one"

    def skip_step(self, metrics) -> bool:
        return metrics["data_step"] == SKIPPED_DATA_STEP


def train_with(monkeypatch, data: Path, run_dir: Path, *extra_plugins: Plugin, **overrides) -> list[Plugin]:
    """A tiny in-process run with plugins=[monitor] (from its YAML) plus `extra_plugins`; returns the plugins."""
    built: list[Plugin] = []
    real_build = train_module.build_plugins

    def build(cfg):
        built.extend([*real_build(cfg), *extra_plugins])
        return built

    monkeypatch.setattr(train_module, "build_plugins", build)
    overrides = {"plugins": "[monitor]", "trainer.max_steps": STEPS, **overrides}
    train_module.run(load_train_config(tiny_overrides(data, run_dir, **overrides)))
    return built


def group_norms_sq(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    sums = dict.fromkeys(GROUPS, 0.0)
    for name, t in tensors.items():
        sums[parameter_group(name)] += float(t.double().pow(2).sum())
    return sums


def monitor_rows(rows: list[dict[str, str]]) -> dict[int, dict[str, str]]:
    """The rows that carry monitor columns, by step (each step at most once)."""
    found = [r for r in rows if any(v for k, v in r.items() if k.startswith("monitor/"))]
    by_step = {int(r["step"]): r for r in found}
    assert len(by_step) == len(found), "a step was monitored twice"
    return by_step


@pytest.fixture(scope="module")
def monitored_run(tiny_data, tmp_path_factory):
    """6 steps of 2 micro-batches, monitored every 2 steps; the batch of update 4 is skipped once."""
    monkeypatch = pytest.MonkeyPatch()
    run_dir = tmp_path_factory.mktemp("monitor") / "run"
    capture = Capture()
    try:
        overrides = {"plugins.monitor.every_n_steps": EVERY, "checkpoint.every_n_steps": 100}
        plugins = train_with(monkeypatch, tiny_data, run_dir, capture, SkipOne(), **overrides)
    finally:
        monkeypatch.undo()
    assert isinstance(plugins[0], Monitor) and plugins[0].cfg.every_n_steps == EVERY
    rows = read_metrics(run_dir)
    core = {int(r["step"]): r for r in rows if r["train/loss"]}
    return monitor_rows(rows), core, capture, run_dir


def test_columns_exist_at_exactly_the_monitored_steps(monitored_run):
    monitored, core, _, _ = monitored_run
    assert sorted(core) == list(range(1, STEPS + 1))
    assert float(core[4]["train/skipped"]) == 1  # the skip happened at a monitored step
    assert sorted(monitored) == [2, 4, 6]
    expected = [f"monitor/{kind}" for kind in ("grad_norm", "param_norm", "update_ratio")]
    expected += [f"monitor/{kind}/{group}" for kind in ("grad_norm", "param_norm", "update_ratio") for group in GROUPS]
    expected += ["monitor/exp_avg_norm", "monitor/exp_avg_sq_norm", "monitor/lr", "monitor/tokens"]
    expected += ["monitor/tokens_per_s"]
    expected += [f"monitor/act_{stat}/layers.{i}" for stat in ("rms", "max") for i in (0, 1)]
    columns = {k for row in monitored.values() for k in row if k.startswith("monitor/")}
    assert columns == set(expected)  # no MFU column on a CPU
    for step, row in monitored.items():
        for column in expected:
            assert math.isfinite(float(row[column])) and float(row[column]) > 0, (step, column)


def test_grad_norm_is_the_cores_and_groups_partition_the_parameters(monitored_run):
    monitored, core, _, _ = monitored_run
    for step, row in monitored.items():
        total = float(row["monitor/grad_norm"])
        assert total == pytest.approx(float(core[step]["train/grad_norm"]), rel=1e-5)
        for kind in ("grad_norm", "param_norm"):
            groups = sum(float(row[f"monitor/{kind}/{g}"]) ** 2 for g in GROUPS)
            assert groups == pytest.approx(float(row[f"monitor/{kind}"]) ** 2, rel=1e-5), (step, kind)


def test_param_norms_and_update_ratios_match_the_captured_parameters(monitored_run):
    monitored, _, capture, _ = monitored_run
    for step, row in monitored.items():
        after, before = capture.params[step], capture.params[step - 1]
        after_sq = group_norms_sq(after)
        before_sq = group_norms_sq(before)
        update_sq = group_norms_sq({name: after[name] - before[name] for name in after})
        assert float(row["monitor/param_norm"]) == pytest.approx(math.sqrt(sum(after_sq.values())), rel=1e-5)
        ratio = math.sqrt(sum(update_sq.values()) / sum(before_sq.values()))
        assert float(row["monitor/update_ratio"]) == pytest.approx(ratio, rel=1e-5)
        for g in GROUPS:
            assert float(row[f"monitor/param_norm/{g}"]) == pytest.approx(math.sqrt(after_sq[g]), rel=1e-5)
            expected = math.sqrt(update_sq[g] / before_sq[g])
            assert float(row[f"monitor/update_ratio/{g}"]) == pytest.approx(expected, rel=1e-5), (step, g)


def test_optimizer_state_norms_match_adamw(monitored_run):
    monitored, _, capture, _ = monitored_run
    for step, row in monitored.items():
        for key in ("exp_avg", "exp_avg_sq"):
            expected = math.sqrt(capture.states[step][key])
            assert float(row[f"monitor/{key}_norm"]) == pytest.approx(expected, rel=1e-5), (step, key)


def test_activation_statistics_match_a_forward_hook_on_the_same_batches(monitored_run):
    monitored, _, capture, _ = monitored_run
    for step, row in monitored.items():
        outputs = capture.block0[step]
        assert len(outputs) == 2  # both micro-batches of the update (of the retried batch at step 4)
        x = torch.cat([o.double().flatten() for o in outputs])
        assert float(row["monitor/act_rms/layers.0"]) == pytest.approx(float(x.pow(2).mean().sqrt()), rel=1e-5)
        assert float(row["monitor/act_max/layers.0"]) == pytest.approx(float(x.abs().max()), rel=1e-6)


def test_lr_tokens_and_throughput(monitored_run):
    monitored, core, _, run_dir = monitored_run
    for step, row in monitored.items():
        assert float(row["monitor/lr"]) == pytest.approx(float(core[step]["train/lr"]), rel=1e-9)
        assert float(row["monitor/tokens"]) == float(core[step]["train/tokens"])
        assert float(row["monitor/tokens_per_s"]) > 0
    events = [e for e in _events(run_dir) if e["event"] == "monitor"]
    assert len(events) == 1 and events[0]["plugin"] == "monitor" and events[0]["every_n_steps"] == EVERY


def _events(run_dir: Path) -> list[dict]:
    from lit_open.train.events import read_events

    return read_events(run_dir / "events.jsonl")


def test_options_switch_columns_off_and_mfu_uses_the_bench_formula(tiny_data, tmp_path, monkeypatch):
    """With a peak FLOP/s (as on a GPU of the table) the row has monitor/mfu = FLOPs/token x tokens/s / peak."""
    from lit_open.bench.throughput import flops_per_token

    monkeypatch.setattr(Monitor, "_peak_flops", lambda self, pl_module: 1e12)
    run_dir = tmp_path / "run"
    options = {
        "every_n_steps": 3,
        "optimizer_state": "false",
        "activations": "false",
        "offload_snapshot": "true",
    }
    untied = {"model.tie_embeddings": "false"}
    quick = {"trainer.max_steps": 4, "trainer.val_check_interval": 0, "trainer.validate_at_start": "false"}
    quick["checkpoint.every_n_steps"] = 100
    monitor_options = {f"plugins.monitor.{k}": v for k, v in options.items()}
    train_with(monkeypatch, tiny_data, run_dir, **untied, **quick, **monitor_options)
    monitored = monitor_rows(read_metrics(run_dir))
    assert sorted(monitored) == [3]
    columns = {k for k in monitored[3] if k.startswith("monitor/") and monitored[3][k]}
    assert not any(c.startswith(("monitor/act_", "monitor/exp_avg")) for c in columns)
    assert "monitor/update_ratio/layers.1" in columns  # from the copy kept in CPU memory
    for kind in ("grad_norm", "param_norm", "update_ratio"):
        assert f"monitor/{kind}/output" in columns  # untied: the head is a group of its own
    for step, row in monitored.items():
        groups = sum(float(row[f"monitor/grad_norm/{g}"]) ** 2 for g in [*GROUPS, "output"])
        assert groups == pytest.approx(float(row["monitor/grad_norm"]) ** 2, rel=1e-5), step
    model = load_train_config(tiny_overrides(tiny_data, run_dir, **untied)).model
    per_token = flops_per_token(model, 32)
    for row in monitored.values():
        expected = per_token * float(row["monitor/tokens_per_s"]) / 1e12
        assert float(row["monitor/mfu"]) == pytest.approx(expected, rel=1e-9)


def test_yaml_defaults_and_config_validation(tiny_data, tmp_path):
    cfg = load_train_config(tiny_overrides(tiny_data, tmp_path, plugins="[monitor]"))
    (monitor,) = build_plugins(cfg.plugins)
    assert isinstance(monitor, Monitor)
    assert monitor.cfg == Monitor.Config()  # the YAML carries the dataclass defaults
    assert monitor.cfg.every_n_steps == 10
    for bad in (0, -3):
        cfg = load_train_config(
            tiny_overrides(tiny_data, tmp_path, plugins="[monitor]", **{"plugins.monitor.every_n_steps": bad})
        )
        with pytest.raises(UserError, match=r"plugins\.monitor\.every_n_steps"):
            build_plugins(cfg.plugins)
    with pytest.raises(UserError, match=r"plugins\.monitor\.every_n_steps"):
        Monitor(every_n_steps=0)
    with pytest.raises(UserError, match="every_n_step"):  # a typo names the accepted keys
        Monitor(every_n_step=5)


def test_parameter_groups():
    assert parameter_group("layers.12.attention.wq.weight") == "layers.12"
    assert parameter_group("tok_embeddings.weight") == "tok_embeddings"
    assert parameter_group("norm.weight") == "norm"
    assert parameter_group("output.weight") == "output"
    assert parameter_group("_orig_mod.layers.3._checkpoint_wrapped_module.ffn_norm.weight") == "layers.3"


# -- several processes, compiled blocks ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["ddp2", "fsdp2", "tp2", "fsdp_tp4", "fsdp1_compiled_checkpointed"])
def test_sharded_and_compiled_runs_log_what_a_plain_run_logs(strategy_runs, setup):
    """The quickstart model for 5 steps under each strategy (tests/strategy_runs.py), monitored at steps 2 and 4."""
    single_process = monitor_rows(read_metrics(strategy_runs["single"]))
    monitored = monitor_rows(read_metrics(strategy_runs[setup]))
    assert sorted(monitored) == sorted(single_process) == [2, 4]
    for step, row in monitored.items():
        reference = single_process[step]
        columns = {k for k, v in reference.items() if k.startswith("monitor/") and v}
        columns -= {"monitor/tokens_per_s"}  # a timing
        assert columns <= {k for k, v in row.items() if v}
        off = {}
        for column in sorted(columns):
            got, want = float(row[column]), float(reference[column])
            off[column] = abs(got - want) / abs(want)
        bad = {c: v for c, v in off.items() if v > tolerance(c)}
        assert not bad, (step, bad)


def tolerance(column: str) -> float:
    """1e-4 relative, as for the losses in tests/distributed (reductions in another order, through 4 steps of
    training); exp_avg_sq, a sum of squared gradients dominated by a few elements, doubles their relative error.
    A sharding mistake (an element counted twice or not at all) is off by far more in its group's column."""
    return 5e-4 if column == "monitor/exp_avg_sq_norm" else 1e-4
