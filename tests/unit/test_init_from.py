"""init_from a lit-open checkpoint, the architecture rules, and checkpoint retention (keep_last + keep_every)."""

from __future__ import annotations

import shutil

import pytest
from conftest import read_metrics, tiny_overrides

from lit_open.checkpoint.resumable import CheckpointWriter, list_checkpoints
from lit_open.checkpoint.source import apply_init_source
from lit_open.compose import explicit_model_keys, load_train_config
from lit_open.errors import UserError
from lit_open.train import run
from lit_open.train.events import read_events


@pytest.fixture(scope="module")
def source_run(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("source") / "run"
    run(load_train_config(tiny_overrides(tiny_data, run_dir, **{"trainer.max_steps": 4})))
    return run_dir


def val_losses(run_dir) -> list[float]:
    return [float(r["val/loss"]) for r in read_metrics(run_dir) if r["val/loss"]]


def test_a_run_starts_from_the_weights_and_optimizer_state_of_a_lit_open_checkpoint(tiny_data, tmp_path, source_run):
    checkpoint = source_run / "checkpoints" / "step-00000004.ckpt"
    run_dir = tmp_path / "finetune"
    cfg = load_train_config(
        [*tiny_overrides(tiny_data, run_dir, **{"trainer.max_steps": 2}), f"init_from={checkpoint}"]
    )
    run(cfg)
    # the held-out loss before the first update is the source run's final one, to the last bit
    assert val_losses(run_dir)[0] == val_losses(source_run)[-1]
    (event,) = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "init_from"]
    assert event["kind"] == "lit_open" and event["source_step"] == 4 and event["optimizer_state"] == "loaded"
    assert f"init_from: {checkpoint}" in (run_dir / "config.yaml").read_text()
    # a resumed run continues from its own checkpoint, not from init_from again
    resumed = run(load_train_config([*tiny_overrides(tiny_data, run_dir, **{"trainer.max_steps": 3}),
                                     f"init_from={checkpoint}"]))  # fmt: skip
    assert resumed["steps"] == 3
    assert len([e for e in read_events(run_dir / "events.jsonl") if e["event"] == "init_from"]) == 1


def resolved(overrides: list[str]):
    """The config a run trains with: composed (no I/O), then init_from applied as lit_open.train.run does."""
    return apply_init_source(load_train_config(overrides), explicit_model_keys(overrides))


def test_the_source_defines_the_architecture_and_an_explicit_conflict_is_refused(tiny_data, tmp_path, source_run):
    checkpoint = source_run / "checkpoints" / "step-00000004.ckpt"
    base = [o for o in tiny_overrides(tiny_data, tmp_path / "x") if not o.startswith("model.")]
    cfg = resolved([*base, f"init_from={checkpoint}"])  # the recipe's quickstart model is replaced
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.vocab_size) == (2, 64, 512)
    cfg = resolved([*base, f"init_from={checkpoint}", "model.attention=math"])  # not an architecture key
    assert cfg.model.attention == "math"
    # a long-context stage's settings: the run's when given, the source's otherwise
    stage = [*base, f"init_from={checkpoint}", "model.rope_theta=40000", "model.max_seq_len=128", "data.seq_len=128"]
    assert (resolved(stage).model.rope_theta, resolved(stage).model.max_seq_len) == (40000.0, 128)
    assert resolved([*base, f"init_from={checkpoint}"]).model.rope_theta == 10000.0
    with pytest.raises(UserError, match=r"model.n_layer=3 \(the source has 2\)"):
        resolved([*base, f"init_from={checkpoint}", "model.n_layer=3"])
    with pytest.raises(UserError, match="init_from='/nowhere.ckpt': no such checkpoint"):
        resolved([*base, "init_from=/nowhere.ckpt"])
    assert load_train_config([*base, "init_from=/nowhere.ckpt"]).init_from == "/nowhere.ckpt"  # composing reads nothing


def test_retention_keeps_the_last_k_plus_every_nth(tmp_path):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    writer = CheckpointWriter(directory, every_n_steps=1, keep_last=2, keep_every=5)
    for step in range(1, 13):
        (directory / f"step-{step:08d}.ckpt").write_text("x")
        writer._prune(step)
    assert [p.name[5:13] for p in list_checkpoints(directory)] == ["00000005", "00000010", "00000011", "00000012"]
    (directory / "step-00000020.ckpt").write_text("x")  # after the step being written: never pruned by it
    writer._prune(12)
    assert [p.name[5:13] for p in list_checkpoints(directory)][-3:] == ["00000011", "00000012", "00000020"]
    with pytest.raises(UserError, match="checkpoint.keep_every=-1"):
        load_train_config(["checkpoint.keep_every=-1"])


@pytest.mark.parametrize(
    "recipe", ["amber_7b_continue", "olmo2_1b_midtrain", "pythia_160m_finetune", "k2_65b_long", "olmo2_7b_long"]
)
def test_fine_tuning_recipes_compose_and_say_how_to_work_offline(recipe, monkeypatch):
    cfg = load_train_config([f"recipe={recipe}", "init_from=null"])  # everything but the download
    assert cfg.run.name == recipe and cfg.trainer.max_steps > 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_train_config([f"recipe={recipe}"]).init_from.startswith("hf:")  # composing downloads nothing
    with pytest.raises(UserError, match=r"Could not download hf:.*init_from=hf:/path/to/dir"):
        resolved([f"recipe={recipe}"])


def test_a_source_without_a_context_length_takes_the_runs(tiny_data, tmp_path):
    """OLMo-core's exporter writes max_position_embeddings -1: init_from takes the run's context and says so."""
    import json

    import transformers

    config = transformers.Olmo2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "olmo_core_export")
    path = tmp_path / "olmo_core_export" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "max_position_embeddings": -1}))
    base = [o for o in tiny_overrides(tiny_data, tmp_path / "run") if not o.startswith("model.")]
    source = f"init_from=hf:{tmp_path / 'olmo_core_export'}"
    assert resolved([*base, source]).model.max_seq_len == 32  # data.seq_len
    assert resolved([*base, source, "model.max_seq_len=48"]).model.max_seq_len == 48
    summary = run(load_train_config([*base, source, "trainer.max_steps=1", "trainer.val_check_interval=0"]))
    assert summary["steps"] == 1
    (event,) = [e for e in read_events(tmp_path / "run" / "events.jsonl") if e["event"] == "init_from"]
    assert event["max_seq_len_from_run"] == 32 and event["kind"] == "hf"
    shutil.rmtree(tmp_path / "olmo_core_export")  # a resumed run takes the architecture from its checkpoint
    assert run(load_train_config([*base, source, "trainer.max_steps=2", "trainer.val_check_interval=0"]))["steps"] == 2


def _resolve_with_a_slow_hub(cache: str, log: str, spec: str) -> None:
    """In a fresh process: resolve `spec` against a stand-in hub whose first download takes a second."""
    import time
    from pathlib import Path

    import huggingface_hub

    from lit_open.checkpoint.hub import resolve_source

    snapshot = Path(cache) / "models--org--tiny" / "snapshots" / ("0" * 40)

    def snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False):
        started = time.time()
        if not snapshot.exists():  # not in the cache yet: "download" it
            time.sleep(1.0)
            snapshot.mkdir(parents=True)
        with open(log, "a") as f:
            f.write(f"{started} {time.time()}\n")
        return str(snapshot)

    huggingface_hub.constants.HF_HUB_CACHE = cache
    huggingface_hub.snapshot_download = snapshot_download
    huggingface_hub.HfApi.list_repo_files = lambda self, repo, revision=None: ["model.safetensors"]
    resolve_source(spec)


def test_one_process_per_cache_downloads_and_the_others_wait_for_it(tmp_path, monkeypatch):
    """Processes of one run resolve init_from before any process group exists: they take turns on a lock in the
    cache, so the first downloads and the others find the snapshot there."""
    import multiprocessing

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    log = tmp_path / "calls.log"
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_resolve_with_a_slow_hub, args=(str(tmp_path / "hub"), str(log), "hf:org/tiny@main"))
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    (first_start, first_end), (second_start, second_end) = sorted(
        tuple(map(float, line.split())) for line in log.read_text().splitlines()
    )
    assert first_end - first_start >= 1.0  # the download
    assert second_start >= first_end and second_end - second_start < 0.5  # after it, from the cache
