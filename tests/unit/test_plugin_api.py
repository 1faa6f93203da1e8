"""The plugin API: the once-per-update hook and the run state, a third-party plugin installed through an entry point,
and each plugin default stated once (its Config dataclass)."""

from __future__ import annotations

import dataclasses
import re
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import REPO, Crash, cli_here, run_cli, tiny_overrides

import lit_open.train.runner as train_module
from lit_open.compose import load_train_config, plugin_defaults, plugin_entry_points
from lit_open.config import TrainConfig
from lit_open.plugin import Plugin, build_plugins, option
from lit_open.train import run
from lit_open.train.events import read_events


class StepEnds(Plugin):
    """Records what the once-per-update hooks see: the step, the run state, the checkpoints written."""

    name = "step_ends"

    @dataclasses.dataclass
    class Config:
        skip_at: list[int] = option([], "data steps whose update is skipped")
        crash_after: int = option(0, "raise after this update (0: never)")

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.ends: list[tuple[int, int, int, int]] = []  # (step, global_step, consumed batches, tokens seen)
        self.saved: list[tuple[int, str]] = []
        self.rows: list[float] = []

    def skip_step(self, metrics) -> bool:
        return metrics["data_step"] in self.cfg.skip_at

    def on_step_end(self, trainer, pl_module, step: int) -> None:
        self.ends.append((step, trainer.global_step, self.run.consumed_batches, self.run.tokens_seen))
        self.rows.append(self.run.last_metrics["train/loss"])  # the update's row is logged already
        if step == self.cfg.crash_after:
            raise Crash(f"after update {step}")

    def on_checkpoint_saved(self, trainer, pl_module, step: int, path: Path) -> None:
        assert path.exists() and (path.parent / "latest").read_text().strip() == path.name
        self.saved.append((step, path.name))


def train_with(plugin: StepEnds, data, run_dir, monkeypatch, **overrides) -> dict:
    monkeypatch.setattr(train_module, "build_plugins", lambda cfg: [plugin])
    return run(load_train_config(tiny_overrides(data, run_dir, **overrides)))


def test_on_step_end_comes_once_per_applied_update_with_the_run_state(tiny_data, tmp_path, monkeypatch):
    plugin = StepEnds(skip_at=[2])  # 8 sequences of 32 tokens per global batch; 2 micro-batches per update
    train_with(plugin, tiny_data, tmp_path / "run", monkeypatch, **{"trainer.max_steps": 6})
    # data step 2 is skipped: no update, no call; the run reaches 6 updates on 7 global batches
    assert [end[0] for end in plugin.ends] == [1, 2, 3, 4, 5, 6]
    assert all(step == global_step for step, global_step, _, _ in plugin.ends)
    assert [consumed for _, _, consumed, _ in plugin.ends] == [1, 2, 4, 5, 6, 7]
    assert [tokens for *_, tokens in plugin.ends] == [c * 8 * 32 for c in (1, 2, 4, 5, 6, 7)]
    assert plugin.saved == [(3, "step-00000003.ckpt"), (6, "step-00000006.ckpt")]
    assert len(plugin.rows) == 6 and all(loss > 0 for loss in plugin.rows)


def test_a_resumed_run_calls_on_step_end_from_the_step_after_its_checkpoint(tiny_data, tmp_path, monkeypatch):
    crashed = StepEnds(crash_after=4)
    with pytest.raises(Crash):
        train_with(crashed, tiny_data, tmp_path / "run", monkeypatch)
    resumed = StepEnds()
    train_with(resumed, tiny_data, tmp_path / "run", monkeypatch)
    assert [end[0] for end in crashed.ends] == [1, 2, 3, 4]
    assert [end[0] for end in resumed.ends] == [4, 5, 6]  # resumed from step 3's checkpoint


THIRD_PARTY = '''
"""A plugin from another package: it knows only lit_open.plugin."""
from dataclasses import dataclass

from lit_open.errors import UserError
from lit_open.plugin import Plugin, option


class Tokens(Plugin):
    """Writes the tokens seen every N updates."""

    name = "tokens_seen"

    @dataclass
    class Config:
        every: int = option(2, "updates between two events")

        def __post_init__(self):
            if self.every < 1:
                raise UserError(f"plugins.tokens_seen.every={self.every} must be at least 1.")

    def on_step_end(self, trainer, pl_module, step):
        if step % self.cfg.every == 0:
            run = self.run
            self.log_event(trainer, pl_module, "tokens_seen", tokens=run.tokens_seen, data=run.consumed_batches)
'''


@pytest.fixture(scope="module")
def third_party_package(tmp_path_factory) -> Path:
    """A package installed the way pip installs one: its module and a dist-info with an entry point."""
    site = tmp_path_factory.mktemp("site")
    (site / "lit_open_tokens_seen.py").write_text(textwrap.dedent(THIRD_PARTY))
    info = site / "lit_open_tokens_seen-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lit-open-tokens-seen\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[lit_open.plugins]\ntokens_seen = lit_open_tokens_seen:Tokens\n")
    return site


@pytest.mark.slow
def test_a_third_party_plugin_installed_by_entry_point_is_selectable_and_checked(
    tiny_data, tmp_path, third_party_package, monkeypatch
):
    env = {"PYTHONPATH": str(third_party_package)}
    monkeypatch.syspath_prepend(str(third_party_package))  # for the in-process calls: listing and start-up errors
    listed = cli_here("list", "plugins")
    assert "tokens_seen  Writes the tokens seen every N updates." in listed.stdout
    assert re.search(r"every +2 +updates between two events", listed.stdout)

    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_data, run_dir, plugins="[tokens_seen]", **{"plugins.tokens_seen.every": 3})
    trained = run_cli("train", *overrides, env=env)
    assert trained.returncode == 0, trained.stderr[-2000:]
    events = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "tokens_seen"]
    assert [(e["step"], e["data"], e["tokens"], e["plugin"]) for e in events] == [
        (3, 3, 3 * 8 * 32, "tokens_seen"),
        (6, 6, 6 * 8 * 32, "tokens_seen"),
    ]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["plugins"]
    assert saved == {"tokens_seen": {"_target_": "lit_open_tokens_seen.Tokens", "every": 3}}

    # its options are checked at start-up: an unknown one, a bad type, a bad value (before any data is read)
    for bad, message in (
        ({"plugins.tokens_seen.evry": 3}, "Unknown option 'evry' of plugin 'tokens_seen'"),
        ({"plugins.tokens_seen.every": "often"}, "plugins.tokens_seen.every='often' must be a whole number"),
        ({"plugins.tokens_seen.every": 0}, "plugins.tokens_seen.every=0 must be at least 1"),
    ):
        result = cli_here("train", *tiny_overrides(tiny_data, tmp_path / "bad", plugins="[tokens_seen]", **bad))
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and not (tmp_path / "bad" / "config.yaml").exists()


# -- each default stated once -------------------------------------------------------------------------------------


BUILT_IN = sorted(plugin_entry_points())


def test_plugin_options_have_no_yaml_and_every_option_has_help():
    assert not (REPO / "conf" / "plugins").exists()
    for name in BUILT_IN:
        (plugin,) = build_plugins({name: {"_target_": plugin_entry_points()[name], **_required(name)}})
        for field in dataclasses.fields(type(plugin).Config):
            assert field.metadata.get("help"), f"plugins.{name}.{field.name} has no help"


def _required(name: str) -> dict:
    return {"tasks": ["x"]} if name == "lm_eval" else {}  # the one option without a usable default


@pytest.mark.parametrize("name", BUILT_IN)
def test_no_plugin_default_is_written_outside_its_config(name):
    """The module docstring is one paragraph, and neither it nor docs/plugins/NAME.md gives an option's default."""
    module = sys.modules[
        type(build_plugins({name: {"_target_": plugin_entry_points()[name], **_required(name)}})[0]).__module__
    ]
    docstring = module.__doc__.strip()
    assert "\n\n" not in docstring, f"plugins/{name}.py: the module docstring keeps one paragraph"
    page = (REPO / "docs" / "plugins" / f"{name}.md").read_text()
    for option_name in plugin_defaults(plugin_entry_points()[name]):
        pattern = re.compile(rf"\b{option_name}\b[^\n]{{0,60}}\bdefault", re.IGNORECASE)
        for text, where in ((docstring, f"plugins/{name}.py"), (page, f"docs/plugins/{name}.md")):
            assert not pattern.search(text), f"{where} states the default of {option_name}"


def test_recipes_set_plugin_options_only_to_other_values_than_the_defaults():
    for recipe in sorted((REPO / "recipes").glob("*.yaml")):
        for name, options in (yaml.safe_load(recipe.read_text()).get("plugins") or {}).items():
            defaults = plugin_defaults(plugin_entry_points()[name])
            same = [key for key, value in options.items() if defaults.get(key) == value]
            assert not same, f"{recipe.name} restates the defaults of plugins.{name}: {same}"


CORE_GROUPS = ("data", "optim", "schedule", "strategy", "trainer", "logger")


@pytest.mark.parametrize("group", CORE_GROUPS)
def test_group_yamls_state_only_what_differs_from_the_schema(group):
    default = dataclasses.asdict(next(f for f in dataclasses.fields(TrainConfig) if f.name == group).default_factory())
    for path in sorted((REPO / "conf" / group).glob("*.yaml")):
        values = yaml.safe_load(path.read_text()) or {}
        assert "name" not in values, f"{path.name}: the group choice is the name"
        same = [key for key, value in values.items() if default.get(key) == value]
        assert not same, f"conf/{group}/{path.name} restates TrainConfig's defaults: {same}"


# -- a group's choice is its name -----------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (REPO / "recipes").glob("*.yaml")))
def test_a_schedule_chosen_on_the_command_line_wins_over_every_recipe(recipe):
    for schedule in ("wsd", "constant", "linear"):
        cfg = load_train_config([f"recipe={recipe}", f"schedule={schedule}"])
        assert cfg.schedule.name == schedule  # regression: every recipe's schedule.name used to win (cosine)
        assert load_train_config([f"recipe={recipe}", f"schedule.name={schedule}"]).schedule == cfg.schedule


def test_a_group_choice_and_its_name_cannot_disagree():
    from lit_open.errors import UserError

    with pytest.raises(UserError, match="strategy=fsdp and strategy.name=ddp disagree"):
        load_train_config(["strategy=fsdp", "strategy.name=ddp"])
    assert load_train_config(["strategy.name=fsdp"]).strategy.name == "fsdp"
    assert load_train_config(["recipe=olmo2_1b_midtrain", "init_from=null"]).schedule.name == "constant"
    # wsd's own floor comes with it unless the recipe sets one (quickstart does not)
    assert load_train_config(["schedule=wsd"]).schedule.min_lr_ratio == 0.0


def test_a_saved_config_takes_a_group_name_as_its_choice(tmp_path):
    from lit_open.compose import to_yaml

    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(load_train_config([])))
    cfg = load_train_config(["schedule.name=wsd", "+optim.lr=0.01"], config_file=saved)
    assert (cfg.schedule.name, cfg.optim.lr) == ("wsd", 0.01)
