"""samples: its options, its seeds, and, end to end through the CLI, what it writes, when, and that the text is
the checkpoint's own greedy continuation, reproducible across identical runs and across a crash and resume."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from conftest import bind_run, run_cli, tiny_overrides
from tokenizers import Tokenizer

import lit_open.plugins.samples as samples_module
from lit_open.checkpoint.source import open_source, read_weights
from lit_open.compose import load_train_config
from lit_open.errors import UserError
from lit_open.generate import generate
from lit_open.model import Transformer
from lit_open.plugin import build_plugins
from lit_open.plugins.samples import Samples, sampling_seed
from lit_open.train.events import read_events

PROMPTS = ["def ", "import os", "The "]
MAX_NEW_TOKENS = 12


def test_defaults_come_from_the_yaml_and_match_the_dataclass():
    (plugin,) = build_plugins(load_train_config(["plugins=[samples]"]).plugins)
    assert isinstance(plugin, Samples)
    assert plugin.cfg == Samples.Config()
    assert plugin.cfg.prompts == ["def ", "import ", "class ", "The "]
    assert (plugin.cfg.every_n_steps, plugin.cfg.max_new_tokens, plugin.cfg.num_sampled) == (500, 48, 1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prompts": []}, "prompts"),
        ({"prompts": ["def ", ""]}, "prompts"),
        ({"every_n_steps": -1}, "every_n_steps=-1"),
        ({"num_sampled": -2}, "num_sampled=-2"),
        ({"max_new_tokens": 0}, "max_new_tokens=0"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"top_k": 0}, "top_k=0"),
        ({"every_n_steps": 0, "at_start": False, "at_end": False}, "generates nothing"),
    ],
)
def test_bad_options_name_the_key(options, message):
    with pytest.raises(UserError, match=f"plugins.samples.*{message}"):
        Samples(**options)


def test_an_unknown_option_is_refused():
    cfg = load_train_config(["plugins=[samples]", "+plugins.samples.temprature=0.5"])
    with pytest.raises(UserError, match="temprature"):
        build_plugins(cfg.plugins)


def test_the_sampling_seed_depends_on_the_run_seed_and_the_step_only():
    assert sampling_seed(1234, 500) == sampling_seed(1234, 500)
    seeds = {sampling_seed(seed, step) for seed in (1, 2) for step in (0, 1, 500)}
    assert len(seeds) == 6 and all(0 <= s < 2**63 for s in seeds)


# -- when it samples ----------------------------------------------------------------------------------------------


@dataclass
class NoConfig:
    pass


def sampled_steps(plugin: Samples, run_dir, updates: list, start_step: int = 0) -> list[int]:
    """Drive the plugin's hooks as LitLM does through `updates` (the step after each global batch; a skipped update
    repeats the step: no on_step_end; ("rollback", s) restores step s) with `sample` recording the step instead of
    generating."""
    sampled = []

    def record(trainer, module):
        sampled.append(trainer.global_step)
        plugin._sampled_step = trainer.global_step

    plugin.sample = record
    one_process = SimpleNamespace(broadcast=lambda obj, src: obj)
    trainer = SimpleNamespace(
        global_step=start_step, is_global_zero=True, default_root_dir=str(run_dir), strategy=one_process
    )
    module = None
    bind_run(plugin, run_dir, config=NoConfig())
    plugin.on_train_start(trainer, module)
    for update in updates:
        if isinstance(update, tuple):
            trainer.global_step = update[1]
            plugin.on_rollback(trainer, module, SimpleNamespace(to_step=update[1]))
        elif update != trainer.global_step:  # an applied update
            trainer.global_step = update
            plugin.on_step_end(trainer, module, update)
    plugin.on_train_end(trainer, module)
    return sampled


@pytest.fixture
def no_tokenizer(monkeypatch):
    monkeypatch.setattr(samples_module, "prompt_encoding", lambda config: None)


def test_samples_at_the_start_every_n_steps_and_at_the_end_once(tmp_path, no_tokenizer):
    assert sampled_steps(Samples(every_n_steps=2), tmp_path, [1, 2, 3, 4, 5]) == [0, 2, 4, 5]
    assert sampled_steps(Samples(every_n_steps=2), tmp_path, [1, 2, 3, 4]) == [0, 2, 4]
    assert sampled_steps(Samples(every_n_steps=2, at_start=False, at_end=False), tmp_path, [1, 2, 3]) == [2]
    assert sampled_steps(Samples(every_n_steps=0), tmp_path, [1, 2, 3]) == [0, 3]


def test_a_skipped_update_is_not_sampled_again_and_a_rollback_samples_the_new_steps(tmp_path, no_tokenizer):
    assert sampled_steps(Samples(every_n_steps=2, at_end=False), tmp_path, [1, 2, 2, 3, 3, 4]) == [0, 2, 4]
    updates = [1, 2, 3, 4, ("rollback", 2), 3, 4, 5]
    assert sampled_steps(Samples(every_n_steps=2), tmp_path, updates) == [0, 2, 4, 4, 5]


def lines(run_dir, *steps: int) -> None:
    (run_dir / "samples.jsonl").write_text("".join(json.dumps({"step": s, "prompt": "x"}) + "\n" for s in steps))


def steps_on_file(run_dir) -> list[int]:
    return [r["step"] for r in samples(run_dir)]


def test_a_resumed_run_drops_later_lines_and_samples_its_first_step_only_when_due_and_missing(tmp_path, no_tokenizer):
    lines(tmp_path, 0, 2, 4, 6)  # a crashed session sampled 6 after its newest checkpoint, 4
    assert sampled_steps(Samples(every_n_steps=2), tmp_path, [5, 6], start_step=4) == [6]
    assert steps_on_file(tmp_path) == [0, 2, 4]  # (the recorder writes nothing)
    lines(tmp_path, 0, 2)  # the session died between checkpoint 4 and its samples
    assert sampled_steps(Samples(every_n_steps=2), tmp_path, [5, 6], start_step=4) == [4, 6]
    lines(tmp_path, 0, 2, 4)
    assert sampled_steps(Samples(every_n_steps=2), tmp_path, [4, 5], start_step=3) == [4, 5]  # 3 was never due
    lines(tmp_path, 0, 2, 4)
    assert sampled_steps(Samples(every_n_steps=2), tmp_path, [1], start_step=0) == [0, 1]
    assert steps_on_file(tmp_path) == []  # a fresh run in an old run.dir starts the file anew


# -- end to end ---------------------------------------------------------------------------------------------------

RUN = {
    "trainer.max_steps": 6,
    "checkpoint.every_n_steps": 2,
    "checkpoint.keep_last": 0,
    "trainer.val_check_interval": 0,
    "trainer.validate_at_start": "false",
    "plugins.samples.every_n_steps": 1,
    "plugins.samples.num_sampled": 2,
    "plugins.samples.max_new_tokens": MAX_NEW_TOKENS,
    "plugins.samples.prompts": "[" + ",".join(f"'{p}'" for p in PROMPTS) + "]",
}


def samples(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def greedy_from_checkpoint(checkpoint, tokenizer: Tokenizer, eos_id: int) -> list[str]:
    """What the plugin should have written for the model in `checkpoint`, computed here independently."""
    source = open_source(str(checkpoint))
    model = Transformer(source.model)
    model.load_state_dict(read_weights(source)[0])
    model.eval()
    prompts = [[eos_id, *tokenizer.encode(p, add_special_tokens=False).ids] for p in PROMPTS]
    return [tokenizer.decode(ids) for ids in generate(model, prompts, MAX_NEW_TOKENS, stop_ids=[eos_id])]


@pytest.mark.slow
def test_writes_the_checkpoints_own_greedy_text_reproducibly_and_resumes_without_duplicates(tiny_data, tmp_path):
    reference = tmp_path / "reference"
    result = run_cli("train", *tiny_overrides(tiny_data, reference, plugins="[samples]", **RUN))
    assert result.returncode == 0, result.stderr[-3000:]
    records = samples(reference)
    steps = [0, 1, 2, 3, 4, 5, 6]  # at_start, then every step; at_end adds nothing at 6
    assert [r["step"] for r in records] == [s for s in steps for _ in PROMPTS]
    assert [r["prompt"] for r in records] == PROMPTS * len(steps)
    assert all(len(r["sampled"]) == 2 and r["temperature"] == 0.8 and r["top_k"] == 50 for r in records)
    assert [r["tokens"] for r in records[:: len(PROMPTS)]] == [s * 8 * 32 for s in steps]  # global batch x seq_len
    events = [e for e in read_events(reference / "events.jsonl") if e["event"] == "samples"]
    assert [e["step"] for e in events] == steps and all(e["prompts"] == len(PROMPTS) for e in events)
    assert events[0]["first"] == (PROMPTS[0] + records[0]["greedy"])[:60]
    assert "samples at step 4" in result.stderr
    tensorboard = b"".join(p.read_bytes() for p in (reference / "logs").glob("events.out.tfevents.*"))
    assert b"samples/prompt_0" in tensorboard and b"samples/prompt_2" in tensorboard

    # the greedy text of a step is the continuation of that step's checkpoint
    tokenizer = Tokenizer.from_file(str(tiny_data / "tokenizer.json"))
    eos_id = json.loads((tiny_data / "train" / "manifest.json").read_text())["tokenizer"]["eos_id"]
    by_step = {s: [r for r in records if r["step"] == s] for s in steps}
    for step in (2, 6):
        expected = greedy_from_checkpoint(reference / "checkpoints" / f"step-{step:08d}.ckpt", tokenizer, eos_id)
        assert [r["greedy"] for r in by_step[step]] == expected, step
    assert [r["greedy"] for r in by_step[6]] != [r["greedy"] for r in by_step[0]]  # the model learned something
    assert any(a != b for r in records for a, b in zip(r["sampled"], r["sampled"][1:]))  # two draws, not one

    # an identical run that crashes after update 5 (its samples of step 5 written, checkpoint 4 the newest) and
    # resumes: the line of step 5 is dropped and written again, step 4 is not sampled twice, and every text,
    # sampled ones included, equals the uninterrupted run's
    run_dir = tmp_path / "crashed"
    args = tiny_overrides(tiny_data, run_dir, plugins="[samples,chaos]", **{**RUN, "plugins.chaos.crash_steps": "[5]"})
    crashed = run_cli("train", *args)
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    assert [r["step"] for r in samples(run_dir)][-1] == 5
    resumed = run_cli("train", *args, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert without_timing(samples(run_dir)) == without_timing(records)
    events = [e["step"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "samples"]
    assert events == [0, 1, 2, 3, 4, 5, 5, 6]  # events.jsonl is a log: it keeps the crashed session's step 5
