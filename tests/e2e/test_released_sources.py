"""Training on released corpora read in place, as a user types it: the same samples written in the Megatron
indexed layout and as LLM360 token_ids lines train exactly as the litdata source they were copied from."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from tests.conftest import cli_here, read_metrics, tiny_overrides, train_losses

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
