"""Training on released corpora read in place, as a user types it: the same samples written in the Megatron
indexed layout and as LLM360 token_ids lines train exactly as the litdata source they were copied from."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from tests.conftest import TINY_LLAMA, cli_here, read_metrics, tiny_overrides, train_losses

SEQ_LEN = 32  # tiny_overrides' data.seq_len


def litdata_samples(split) -> np.ndarray:
    """Every sample of seq_len + 1 tokens of a prepared split, in index order."""
    from litdata import StreamingDataset, TokensLoader

    stream = StreamingDataset(str(split), item_loader=TokensLoader(block_size=SEQ_LEN + 1), shuffle=False)
    return np.stack([np.asarray(stream[i]) for i in range(len(stream))]).astype(np.uint16)


def write_megatron(prefix, samples: np.ndarray) -> None:
    """MMIDIDX: a 34-byte header, int32 lengths, int64 byte pointers, int64 document indices (one document per
    sample), written from the layout in Megatron-LM's megatron/core/datasets/indexed_dataset.py."""
    n, length = samples.shape
    samples.tofile(f"{prefix}.bin")
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, n, n + 1))  # version 1, dtype code 8: uint16
        f.write(np.full(n, length, "<i4").tobytes())
        f.write((np.arange(n, dtype="<i8") * length * 2).tobytes())
        f.write(np.arange(n + 1, dtype="<i8").tobytes())


def write_llm360(directory, samples: np.ndarray, per_file: int) -> None:
    directory.mkdir()
    for k, start in enumerate(range(0, len(samples), per_file)):
        with open(directory / f"train_{k:03d}.jsonl", "w") as f:
            for row in samples[start : start + per_file]:
                f.write(json.dumps({"token_ids": row.tolist(), "source": "stdlib"}) + "\n")


@pytest.fixture(scope="module")
def copies(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    train, val = litdata_samples(tiny_data / "train"), litdata_samples(tiny_data / "val")
    write_megatron(root / "train", train)
    write_llm360(root / "val", val, per_file=400)
    return root


def run(tiny_data, run_dir, **sources):
    extra = {"trainer.max_steps": 4, "trainer.val_check_interval": 2, "checkpoint.every_n_steps": 4, **sources}
    result = cli_here("train", *tiny_overrides(tiny_data, run_dir, **extra))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_released_layouts_train_exactly_as_the_litdata_source_they_copy(tiny_data, copies, tmp_path):
    run(tiny_data, tmp_path / "litdata")
    released = {
        "data.sources": f"[{{path:{copies / 'train'},format:megatron}}]",
        "data.val_sources": f"[{{path:{copies / 'val'},format:llm360}}]",
    }
    run(tiny_data, tmp_path / "released", **released)
    reference, replayed = train_losses(tmp_path / "litdata"), train_losses(tmp_path / "released")
    assert sorted(replayed) == [1, 2, 3, 4]
    assert replayed == pytest.approx(reference, rel=1e-6)

    def held_out(name):
        return [float(r["val/loss"]) for r in read_metrics(tmp_path / name) if r["val/loss"]]

    # lit-open data locate computes lit-open's mixture: the sample the log shows in global batch 2 is found there
    from lit_open.commands.data import data_command

    logged = json.loads((tmp_path / "litdata" / "data_sequence" / "00000000.jsonl").read_text().splitlines()[2])
    source, index = logged["samples"][5]
    found = data_command(["locate", f"run.dir={tmp_path / 'litdata'}", f"sample=[{source},{index}]"])
    assert 2 in found["data_steps"] and found["released_steps"] == []
    shown = data_command(["show", f"run.dir={tmp_path / 'litdata'}", "step=3", "samples=0"])
    assert shown["data_step"] == 2 and shown["samples"] == logged["samples"]
    assert len(held_out("released")) == 3  # at the start, step 2 and step 4, from the llm360 lines (3 files)
    assert held_out("released") == pytest.approx(held_out("litdata"), rel=1e-6)
    sources = json.loads((tmp_path / "released" / "data_sequence" / "sources.json").read_text())["sources"]
    assert sources[0]["format"] == "megatron" and sources[0]["samples"] == len(litdata_samples(tiny_data / "train"))


def test_a_released_source_that_does_not_fit_stops_at_start_up(tiny_data, copies, tmp_path):
    # Pythia-style fixed-length items of 33 tokens do not make samples of data.seq_len=16 (+1)
    wrong_len = {"data.sources": f"[{{path:{copies / 'train'},format:megatron}}]", "data.seq_len": 16}
    result = cli_here("train", *tiny_overrides(tiny_data, tmp_path / "a", **wrong_len))
    assert result.returncode == 2 and "data.sources[0]" in result.stderr, result.stderr[-2000:]
    missing_dtype = {"data.sources": f"[{{path:{copies},format:numpy}}]"}
    result = cli_here("train", *tiny_overrides(tiny_data, tmp_path / "b", **missing_dtype))
    assert result.returncode == 2 and "data.sources[0].dtype" in result.stderr, result.stderr[-2000:]


def offline_hub_revision(cache, repo: str, revision: str) -> None:
    """A tiny Llama in a huggingface_hub cache at `revision`, as a download of hf:REPO@REVISION leaves it."""
    import transformers

    config = transformers.LlamaConfig(**TINY_LLAMA)
    commit = "c" * 40
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / revision).write_text(commit)


@pytest.mark.slow
def test_continuing_a_released_checkpoint_trains_the_next_chunk_and_resumes_exactly(tiny_data, tmp_path, monkeypatch):
    """init_from=hf:org/amber-tiny@ckpt_2 on chunk files 0..4 (2 steps each): the run starts with chunk 3, the
    LR schedule at released step 6; killed after step 2 and resumed, it repeats the uninterrupted run's losses."""
    import huggingface_hub

    from tests.conftest import run_cli

    cache = tmp_path / "hub"
    offline_hub_revision(cache, "org/amber-tiny", "ckpt_2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    samples = litdata_samples(tiny_data / "train")[:40]
    write_llm360(tmp_path / "amber", samples, per_file=8)  # train_000..train_004
    extra = {
        "init_from": "hf:org/amber-tiny@ckpt_2",
        "data.sources": f"[{{path:{tmp_path / 'amber'},format:llm360}}]",
        "data.order": "llm360",
        "data.global_batch_size": 4,
        "data.micro_batch_size": 2,
        "trainer.max_steps": 4,
        "trainer.val_check_interval": 0,
        "checkpoint.every_n_steps": 1,
        "schedule.warmup_steps": 4,
        "schedule.total_steps": 12,
    }
    reference = cli_here("train", *tiny_overrides(tiny_data, tmp_path / "reference", **extra))
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert "released llm360 order (docs/data.md) from released step 6" in reference.stderr + reference.stdout
    lines = [json.loads(line) for line in (tmp_path / "reference" / "data_sequence" / "00000000.jsonl").open()]
    assert [line["released_step"] for line in lines] == [6, 7, 8, 9]
    assert [line["files"] for line in lines[:3]] == [
        [["train_003.jsonl", k] for k in range(4)],
        [["train_003.jsonl", k] for k in range(4, 8)],
        [["train_004.jsonl", k] for k in range(4)],
    ]
    lrs = [float(r["train/lr"]) for r in read_metrics(tmp_path / "reference") if r["train/lr"]]
    cosine = [0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (6 + n - 4) / (12 - 4))) for n in (1, 2, 3, 4)]
    assert lrs == pytest.approx([1e-2 * c for c in cosine], rel=1e-5)  # schedule steps 7-10, as the released run

    run_dir = tmp_path / "killed"
    overrides = tiny_overrides(tiny_data, run_dir, **extra)
    crashed = run_cli(
        "train", *overrides, "plugins=[chaos]", "plugins.chaos.crash_steps=[2]", env={"HF_HUB_CACHE": str(cache)}
    )
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    resumed = cli_here("train", *overrides, "plugins=[chaos]", "plugins.chaos.crash_steps=[2]", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert train_losses(run_dir) == pytest.approx(train_losses(tmp_path / "reference"), rel=1e-6)
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4]
    saved = (run_dir / "config.yaml").read_text()
    assert "start_step: 6" in saved

    # lit-open data: the decoded samples of a step, and the step that trained on a released line or a text
    from lit_open.commands.data import data_command
    from lit_open.data.tokenizer import load_tokenizer

    reference = tmp_path / "reference"
    shown = data_command(["show", f"run.dir={reference}", "step=2", "samples=0"])
    assert shown["data_step"] == 1 and shown["samples"] == lines[1]["samples"]
    tokenizer = load_tokenizer(tiny_data / "tokenizer.json")
    line_5 = json.loads((tmp_path / "amber" / "train_003.jsonl").read_text().splitlines()[5])["token_ids"]
    assert shown["shown"][1]["text"] == tokenizer.decode(line_5, skip_special_tokens=False)
    assert shown["shown"][1]["file"] == ("train_003.jsonl", 5)
    assert data_command(["show", f"run.dir={reference}", "released_step=9"])["samples"] == lines[3]["samples"]
    found = data_command(["locate", f"run.dir={reference}", "file=train_004.jsonl", "index=5"])
    assert found["data_steps"] == [3] and found["released_steps"] == [9]
    before = data_command(["locate", f"run.dir={reference}", "file=train_001.jsonl", "index=0"])
    assert before["released_steps"] == [2] and before["data_steps"] == [-4]  # trained before ckpt_2
    needle = shown["shown"][2]["text"][10:40]
    hits = data_command(["locate", f"run.dir={reference}", f"contains={needle}", "steps=[0,3]"])["hits"]
    assert {"data_step": 1, "source": 0, "index": shown["samples"][2][1]} in [
        {k: h[k] for k in ("data_step", "source", "index")} for h in hits
    ]
    refused = cli_here("data", "show", f"run.dir={reference}", "released_step=2")
    assert refused.returncode == 2 and "released_step=2 precedes this run's start, released step 6" in refused.stderr
