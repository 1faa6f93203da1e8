"""The gc plugin: automatic GC off during training and back after, collections exactly every N optimizer steps."""

from __future__ import annotations

import gc
import sys
from types import SimpleNamespace

import pytest
from conftest import bind_run, tiny_overrides

import lit_open.train.runner as train_module
from lit_open.compose import load_train_config
from lit_open.errors import UserError
from lit_open.plugin import Plugin, build_plugins
from lit_open.plugins import gc as gc_plugin
from lit_open.plugins.gc import GarbageCollection
from lit_open.train import run
from lit_open.train.events import read_events


@pytest.fixture(autouse=True)
def restore_gc():
    """Whatever a test does, the test process gets its collector back as it was."""
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    (gc.enable if enabled else gc.disable)()


class Probe(Plugin):
    """Sees the collector's state from inside the run, and which step the plugin's collections happen at."""

    name = "probe"

    def __init__(self, crash_at_step: int | None = None):
        super().__init__()
        self.trainer = None
        self.enabled_at_start: bool | None = None
        self.enabled_in_batches: set[bool] = set()
        self.crash_at_step = crash_at_step

    def on_train_start(self, trainer, pl_module):  # runs after the gc plugin's: it is listed after it
        self.trainer = trainer
        self.enabled_at_start = gc.isenabled()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.enabled_in_batches.add(gc.isenabled())
        if trainer.global_step == self.crash_at_step:
            raise RuntimeError("injected crash")


def record_collections(monkeypatch, probe: Probe) -> list[tuple[int, int]]:
    """(optimizer step, generation) of every gc.collect call made by the plugin module; others pass untouched."""
    calls: list[tuple[int, int]] = []
    real_collect = gc.collect

    def collect(generation: int = 2) -> int:
        if sys._getframe(1).f_globals.get("__name__") == gc_plugin.__name__:
            calls.append((probe.trainer.global_step, generation))
        return real_collect(generation)

    monkeypatch.setattr(gc, "collect", collect)
    return calls


def train(data, run_dir, monkeypatch, probe: Probe, *plugin_overrides: str) -> dict:
    real_build = train_module.build_plugins
    monkeypatch.setattr(train_module, "build_plugins", lambda cfg: [*real_build(cfg), probe])
    extra = {"data.micro_batch_size": 2, "trainer.validate_at_start": "false", "trainer.val_check_interval": 0}
    try:
        return run(load_train_config([*tiny_overrides(data, run_dir, **extra), *plugin_overrides]))
    finally:
        monkeypatch.setattr(train_module, "build_plugins", real_build)


def test_collects_every_n_optimizer_steps_with_automatic_gc_off(tiny_data, tmp_path, monkeypatch):
    assert gc.isenabled()
    probe = Probe()
    calls = record_collections(monkeypatch, probe)
    options = ["plugins=[gc]", "plugins.gc.every_n_steps=2", "plugins.gc.generation=0", "plugins.gc.warn_seconds=0"]
    summary = train(tiny_data, tmp_path / "run", monkeypatch, probe, *options)  # 4 micro-batches per step
    assert summary["steps"] == 6
    assert probe.enabled_at_start is False and probe.enabled_in_batches == {False}
    assert gc.isenabled()  # given back at train end
    # once per step that is a multiple of 2, not once per micro-batch of it
    assert calls == [(2, 0), (4, 0), (6, 0)]
    events = [e for e in read_events(tmp_path / "run" / "events.jsonl") if e["event"] == "gc"]
    assert events[0]["action"] == "disable" and events[0]["every_n_steps"] == 2 and events[0]["generation"] == 0
    collected = events[1:]  # warn_seconds=0: every collection is recorded, with its duration
    assert [e["step"] for e in collected] == [2, 4, 6]
    assert all(e["action"] == "collect" and e["seconds"] >= 0 and e["plugin"] == "gc" for e in collected)


def test_a_failing_run_gives_automatic_gc_back(tiny_data, tmp_path, monkeypatch):
    probe = Probe(crash_at_step=1)
    with pytest.raises(RuntimeError, match="injected crash"):
        train(tiny_data, tmp_path / "run", monkeypatch, probe, "plugins=[gc]")
    assert probe.enabled_in_batches == {False}
    assert gc.isenabled()


def fake_run(plugin, tmp_path, step: int = 0) -> tuple[SimpleNamespace, None]:
    bind_run(plugin, tmp_path)
    return SimpleNamespace(global_step=step), None


def test_steps_skips_resume_threshold_and_freeze(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: calls.append(generation) or 0)
    clock = iter(range(0, 1000, 2))  # every collection "takes" 2 s
    monkeypatch.setattr(gc_plugin, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    plugin = GarbageCollection(every_n_steps=3, warn_seconds=1.5, freeze=True)
    trainer, module = fake_run(plugin, tmp_path, step=3)  # resumed at step 3: no collection for it
    plugin.on_train_start(trainer, module)
    assert not gc.isenabled() and gc.get_freeze_count() > 0 and calls == [2]  # one full collection, then freeze
    calls.clear()
    for step in (3, 3, 4, 4, 5, 5, 5, 6, 6, 7, 8, 9):  # micro-batches of one step; 5 repeats: a skipped update
        end_of_update = step != trainer.global_step  # LitLM calls on_step_end once per applied update
        trainer.global_step = step
        if end_of_update:
            plugin.on_step_end(trainer, module, step)
    assert calls == [1, 1] and plugin.collections == 2  # at steps 6 and 9, once each
    slow = [e for e in read_events(tmp_path / "events.jsonl") if e.get("action") == "collect"]
    assert [(e["step"], e["seconds"]) for e in slow] == [(6, 2), (9, 2)]
    plugin.on_train_end(trainer, module)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    plugin.teardown(trainer, module, "fit")  # restoring twice changes nothing
    assert gc.isenabled()

    gc.disable()  # a collector that was off before the run stays off after it
    plugin = GarbageCollection()
    plugin.on_train_start(*fake_run(plugin, tmp_path))
    plugin.on_exception(*fake_run(plugin, tmp_path), RuntimeError())
    assert not gc.isenabled()


def test_options_come_from_the_yaml_and_are_validated():
    cfg = load_train_config(["plugins=[gc]"])
    assert cfg.plugins["gc"] == {
        "_target_": "lit_open.plugins.gc.GarbageCollection",
        "every_n_steps": 1000,
        "generation": 1,
        "freeze": False,
        "warn_seconds": 1.0,
    }
    (plugin,) = build_plugins(cfg.plugins)
    assert isinstance(plugin, GarbageCollection) and plugin.cfg == GarbageCollection.Config()
    for key, bad in (("every_n_steps", "0"), ("generation", "3"), ("warn_seconds", "-1")):
        cfg = load_train_config(["plugins=[gc]", f"plugins.gc.{key}={bad}"])
        with pytest.raises(UserError, match=rf"plugins\.gc\.{key}"):
            build_plugins(cfg.plugins)
