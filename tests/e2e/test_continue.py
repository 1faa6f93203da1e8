"""Continuing and restarting runs as a user types the commands: one lineage per run directory (nothing lost or
mixed), a schedule fixed when the run starts, resumes that refuse what they cannot honour, and the summary's
suggested commands (run here as printed)."""

from __future__ import annotations

import shlex

import pytest

from lit_open.compose import load_train_config
from lit_open.config import ScheduleConfig
from lit_open.train.events import read_events
from lit_open.train.optim import lr_factor
from tests.conftest import cli_here, read_metrics, tiny_overrides, train_losses

LR = 1e-2  # tiny_overrides' optim.lr


def lrs(run_dir) -> dict[int, float]:
    return {int(r["step"]): float(r["train/lr"]) for r in read_metrics(run_dir) if r["train/lr"]}


def checkpoints(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))


def latest(run_dir) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def printed_command(stderr: str, label: str) -> list[str]:
    """The arguments of a `lit-open ...` command the summary suggests after `label`, split as a shell would."""
    line = next(line for line in stderr.splitlines() if line.strip().startswith(label))
    command = line.split(label, 1)[1].split("  (")[0].strip()
    args = shlex.split(command)
    assert args[0] == "lit-open"
    return args[1:]


def test_a_run_directory_holds_one_lineage_and_continuing_keeps_the_schedule(tiny_data, tmp_path):
    run_dir = tmp_path / "my run"  # a space: suggested commands must be quoted for the shell
    first = cli_here("train", *tiny_overrides(tiny_data, run_dir))
    assert first.returncode == 0, first.stderr
    assert checkpoints(run_dir) == ["step-00000003.ckpt", "step-00000006.ckpt"]

    # a fresh start over a run's checkpoints is refused, and changes nothing
    refused = cli_here("train", *tiny_overrides(tiny_data, run_dir, resume="none", **{"trainer.max_steps": 4}))
    assert refused.returncode == 2
    assert "holds the checkpoints of an earlier run" in refused.stderr and "resume=auto" in refused.stderr
    assert "move_aside=true" in refused.stderr
    assert checkpoints(run_dir) == ["step-00000003.ckpt", "step-00000006.ckpt"]

    # ... unless asked to move the earlier run aside: intact, and never pruned by the new run's retention
    extra = {"trainer.max_steps": 4, "checkpoint.every_n_steps": 2, "checkpoint.keep_last": 2}
    restart = cli_here("train", *tiny_overrides(tiny_data, run_dir, resume="none", move_aside="true", **extra))
    assert restart.returncode == 0, restart.stderr
    (aside,) = (run_dir / "superseded").iterdir()
    assert sorted(p.name for p in (aside / "checkpoints").glob("step-*")) == [
        "step-00000003.ckpt",
        "step-00000006.ckpt",
    ]
    assert sorted(train_losses(aside)) == [1, 2, 3, 4, 5, 6]  # its logs went with it
    assert checkpoints(run_dir) == ["step-00000002.ckpt", "step-00000004.ckpt"]
    assert latest(run_dir) == "step-00000004.ckpt"
    saved = (run_dir / "config.yaml").read_text()
    assert "resume" not in saved and "move_aside" not in saved  # launch options, not part of the run
    assert "total_steps: 4" in saved  # the schedule's length, fixed at the start
    moved = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "moved_aside"]
    assert moved and moved[0]["to"] == str(aside)

    # re-running the finished run: nothing to do, nothing written
    config = str(run_dir / "config.yaml")
    rows = len(read_metrics(run_dir))
    again = cli_here("train", "--config", config)
    assert again.returncode == 0 and "already at step 4" in again.stderr and "nothing to do" in again.stderr
    assert len(read_metrics(run_dir)) == rows

    # resuming with another batch shape is refused, naming the values
    for key, value in (("data.global_batch_size", 16), ("data.seq_len", 16)):
        changed = cli_here("train", "--config", config, f"{key}={value}", "trainer.max_steps=8")
        assert changed.returncode == 2
        assert f"{key}=" in changed.stderr and f"{value} now" in changed.stderr, changed.stderr

    # the summary's "continue training" command, as printed: the LR holds the schedule's final value
    command = printed_command(restart.stderr, "continue training:")
    assert command[:3] == ["train", "--config", config] and command[3] == "trainer.max_steps=8"
    more = cli_here(*command, "+plugins=z_loss")  # a plugin added to a saved config, as to a recipe
    assert more.returncode == 0, more.stderr
    assert "steps 5-8 hold the final LR" in more.stderr
    final = LR * ScheduleConfig(warmup_steps=2).min_lr_ratio
    assert [lrs(run_dir)[s] for s in (5, 6, 7, 8)] == pytest.approx([final] * 4)
    assert [int(r["step"]) for r in read_metrics(run_dir) if r.get("train/z_loss")] == [5, 6, 7, 8]
    assert checkpoints(run_dir) == ["step-00000006.ckpt", "step-00000008.ckpt"]

    # resuming an earlier checkpoint of the run with a re-planned schedule: the later checkpoint moves aside,
    # `latest` names the new one, and the first resumed update already has the new plan's LR
    older = run_dir / "checkpoints" / "step-00000006.ckpt"
    replan = cli_here("train", "--config", config, f"resume={older}", "trainer.max_steps=7", "schedule.total_steps=12")
    assert replan.returncode == 0, replan.stderr
    assert "re-planned from 4 steps" in replan.stderr
    assert lrs(run_dir)[7] == pytest.approx(LR * lr_factor(7, ScheduleConfig(warmup_steps=2), 12))
    assert checkpoints(run_dir) == ["step-00000006.ckpt", "step-00000007.ckpt"]
    assert latest(run_dir) == "step-00000007.ckpt"
    assert any((p / "checkpoints" / "step-00000008.ckpt").exists() for p in (run_dir / "superseded").iterdir())


def test_a_schedule_fixed_at_the_start_makes_a_split_run_repeat_a_straight_one(tiny_data, tmp_path):
    """15 steps then a resume to 30 used to re-stretch the cosine; with schedule.total_steps set, the split run
    repeats the straight one update for update (LR and loss)."""
    extra = {"trainer.val_check_interval": 0, "schedule.total_steps": 8, "checkpoint.every_n_steps": 4}
    straight = cli_here("train", *tiny_overrides(tiny_data, tmp_path / "straight", **extra, **{"trainer.max_steps": 8}))
    assert straight.returncode == 0, straight.stderr
    split_dir = tmp_path / "split"
    half = cli_here("train", *tiny_overrides(tiny_data, split_dir, **extra, **{"trainer.max_steps": 4}))
    assert half.returncode == 0, half.stderr
    rest = cli_here("train", "--config", str(split_dir / "config.yaml"), "trainer.max_steps=8")
    assert rest.returncode == 0, rest.stderr
    assert lrs(split_dir) == pytest.approx(lrs(tmp_path / "straight"), rel=1e-12)
    full, split = train_losses(tmp_path / "straight"), train_losses(split_dir)
    assert sorted(split) == sorted(full) == list(range(1, 9))
    for step in full:
        assert split[step] == pytest.approx(full[step], rel=1e-6), f"step {step}"


@pytest.mark.parametrize(
    "overrides, check",
    [
        (["strategy=auto"], lambda c: c.strategy.name == "auto"),
        (["strategy=fsdp"], lambda c: c.strategy.name == "fsdp"),
        (["plugins=[]"], lambda c: c.plugins == {}),
        (["plugins=[z_loss]"], lambda c: list(c.plugins) == ["z_loss"]),
        (["+plugins=z_loss"], lambda c: list(c.plugins) == ["lm_eval", "z_loss"]),
        (["model=pythia_160m"], lambda c: c.model.name == "pythia_160m" and c.model.n_layer == 12),
        (["schedule=wsd"], lambda c: c.schedule.name == "wsd"),
        (["plugins.lm_eval.limit=7"], lambda c: c.plugins["lm_eval"]["limit"] == 7),
    ],
)
def test_a_saved_config_takes_the_overrides_a_recipe_takes(tmp_path, overrides, check):
    from lit_open.compose import to_yaml

    saved = tmp_path / "config.yaml"
    original = load_train_config([f"run.dir={tmp_path}", "plugins.lm_eval.batch_size=3"])
    saved.write_text(to_yaml(original))
    cfg = load_train_config(overrides, config_file=saved)
    assert check(cfg)
    assert cfg.run.recipe == "quickstart" and cfg.run.dir == str(tmp_path)
    if "lm_eval" in cfg.plugins:
        assert cfg.plugins["lm_eval"]["batch_size"] == 3  # the saved options of a plugin it keeps


@pytest.mark.parametrize(
    "args, message",
    [
        (["++plugins=[z_loss]"], "'++' does not apply to a config group"),
        (["+plugins=z_loss", "+plugins=z_loss"], "Plugin 'z_loss' is selected twice"),
        (["plugins=[z_loss]", "+plugins=z_loss"], "give one list with every plugin once, plugins=[z_loss]."),
        (["plugins=[]", "+plugins=z_loss"], "give one list with every plugin once, plugins=[z_loss]."),
        (["recipe=pythia_160m"], "--config and recipe= both"),
    ],
)
def test_overrides_of_a_saved_config_that_cannot_work_say_what_to_write(tmp_path, args, message):
    from lit_open.compose import to_yaml

    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(load_train_config([f"run.dir={tmp_path}"])))
    result = cli_here("train", "--config", str(saved), *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_mistyped_data_path_is_named_and_no_recipe_data_is_prepared(tiny_data, tmp_path, monkeypatch):
    cache = tmp_path / "cache"  # where the quickstart recipe would prepare its data
    monkeypatch.setenv("LIT_OPEN_CACHE", str(cache))
    typo = tmp_path / "mine" / "trian"
    result = cli_here("train", f"run.dir={tmp_path / 'run'}", f"data.sources=[{{path:{typo}}}]")
    assert result.returncode == 2
    assert f"data.sources[0].path='{typo}' holds no prepared data" in result.stderr
    assert "Preparing data" not in result.stderr and "overwrite" not in result.stderr
    # the recipe's own data.prepare and val_sources beside your data.sources: refused before preparing anything
    mixed = cli_here("train", f"run.dir={tmp_path / 'run2'}", f"data.sources=[{{path:{tiny_data}/train}}]")
    assert mixed.returncode == 2 and "would be mixed with yours" in mixed.stderr, mixed.stderr
    assert not cache.exists()


def test_a_missing_in_loop_benchmark_fails_before_the_first_validation(tiny_data, tmp_path):
    tokenizer_dir = tmp_path / "tok"  # a tokenizer with no prepared tasks beside it
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer.json").write_bytes((tiny_data / "tokenizer.json").read_bytes())
    extra = {"data.tokenizer": tokenizer_dir / "tokenizer.json", "plugins": "[lm_eval]"}
    result = cli_here("train", *tiny_overrides(tiny_data, tmp_path / "run", **extra))
    assert result.returncode == 2 and "prepared:next_line" in result.stderr and "plugins=[]" in result.stderr
    assert not (tmp_path / "run" / "logs" / "metrics.csv").exists()  # no validation ran first
