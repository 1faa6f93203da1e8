"""`python -m lit_open.bench data`: every source format read through training's loader, checked against the corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lit_open.bench import data_loading
from lit_open.bench.__main__ import main

FORMATS = ("litdata", "megatron", "numpy", "llm360")
TINY = [
    *("--tokens", "40000", "--seq-len", "64", "--micro-batch", "4", "--workers", "1", "--chunk-tokens", "4096"),
    *("--seconds", "0.1", "--warmup-batches", "3", "--rss-batches", "5", "--scale", "3"),
]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-data")
    out = root / "bench-data.json"
    report = main(["data", *TINY, "--dir", str(root / "corpus"), "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=str))
    return report | {"root": root}


def test_every_format_is_read_at_a_positive_rate_and_is_the_corpus(report):
    assert report["benchmark"] == "data" and report["config"]["workers"] == 1
    results = report["results"]
    assert set(results["formats"]) == set(FORMATS)
    assert results["target_tokens_per_s_per_worker"] == 3_000_000 and results["all_verified"]
    for fmt, r in results["formats"].items():
        for run in ("in_process", "with_workers"):
            rates = r[run]
            assert rates["samples_per_s"] > 0 and rates["tokens_per_s"] == pytest.approx(rates["samples_per_s"] * 64)
            assert rates["tokens_per_s_per_worker"] == rates["tokens_per_s"]  # 0 workers: the main process; 1: one
        # the tokens of every checked sample are the stream's at the sample's place in this format's layout
        assert r["verified"] and r["scaled_verified"], (fmt, r["errors"])
        assert r["verified_samples"] >= 4 * 4 and r["checksum_read"] == r["checksum_expected"]
        memory = r["memory"]
        assert memory["x3"]["samples"] == 3 * memory["x1"]["samples"] == 3 * r["samples"]
        for scale in ("x1", "x3"):
            assert memory[scale]["peak_rss_mib"] >= memory[scale]["peak_pss_mib"] > 0
        assert memory["rss_growth"] > 0 and memory["pss_growth"] > 0
        assert isinstance(r["meets_target"], bool)
    litdata = results["formats"]["litdata"]
    assert set(litdata["vs_reference"]) == {"in_process", "with_workers"}
    for run, ratio in litdata["vs_reference"].items():
        assert ratio == pytest.approx(litdata[run]["tokens_per_s"] / litdata["reference"][run]["tokens_per_s"])
    assert "vs_reference" not in results["formats"]["megatron"]


def test_the_check_catches_a_wrong_token_or_key(report):
    corpus = json.loads((report["root"] / "corpus" / "corpus.json").read_text())["corpus"]
    block = 65
    for fmt in FORMATS:
        truth = data_loading.Truth(fmt, corpus, block)
        source = data_loading.open_source(fmt, corpus["formats"][fmt]["path"], block)
        batch = next(iter(data_loading.lit_open_loader(source, block, 4, 0, seed=0)))
        good = data_loading.Checker(truth, 4, 0, source.samples)
        good.check(batch, 0)
        assert good.report()["verified"], fmt
        batch["targets"][2, -1] += 1  # one token of the third sample
        wrong = data_loading.Checker(truth, 4, 0, source.samples)
        wrong.check(batch, 0)
        assert not wrong.report()["verified"] and "tokens differ" in wrong.report()["errors"][0]
        batch["targets"][2, -1] -= 1
        other = data_loading.Checker(truth, 4, 0, source.samples)
        other.check(batch, 1)  # the keys of the second micro-batch are other samples
        assert not other.report()["verified"]


def test_truth_is_independent_of_the_readers(report):
    """The litdata truth comes from the stream and index.json's token counts: it matches the chunk bytes."""
    corpus = json.loads((report["root"] / "corpus" / "corpus.json").read_text())["corpus"]
    truth = data_loading.Truth("litdata", corpus, 65)
    stream = np.fromfile(corpus["stream"], dtype=np.uint16)
    index = json.loads((report["root"] / "corpus" / "x1" / "litdata" / "index.json").read_text())
    first = index["chunks"][1]
    raw = np.fromfile(report["root"] / "corpus" / "x1" / "litdata" / first["filename"], dtype=np.uint8)
    tokens = raw[4 * (first["chunk_size"] + 2) :].view(np.uint16)  # litdata's chunk: count, offsets, then the data
    sample = index["chunks"][0]["dim"] // 65  # the first sample of the second chunk
    assert np.array_equal(truth.sample(sample), tokens[:65].astype(np.int64))
    assert np.array_equal(tokens, stream[index["chunks"][0]["dim"] :][: first["dim"]])


def test_a_worker_hands_over_the_batches_training_reads_in_process(report):
    """TokenSamples.collate in a DataLoader worker ships arrays that become the very batch of the in-process loader
    (document ids included)."""
    import torch

    from lit_open.config import DataConfig
    from lit_open.data.datamodule import DataModule

    corpus = json.loads((report["root"] / "corpus" / "corpus.json").read_text())["corpus"]
    source = data_loading.open_source("litdata", corpus["formats"]["litdata"]["path"], 65)
    keys = [[(0, i, 7, m, 3) for i in range(m * 4, m * 4 + 4)] for m in range(3)]
    batches = {}
    for workers in (0, 1):
        module = DataModule(DataConfig(seq_len=64, micro_batch_size=4, document_mask=True), seed=0)
        batches[workers] = list(module._loader([source], keys, workers=workers))
    for in_process, shipped in zip(*batches.values(), strict=True):
        assert (
            list(in_process)
            == list(shipped)
            == [*("doc_ids", "input_ids", "targets", "samples", "data_step", "micro", "n_micro")]
        )
        for key, value in in_process.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == shipped[key].dtype and torch.equal(value, shipped[key]), key
            else:
                assert value == shipped[key], key
        assert in_process["input_ids"].dtype == torch.int64 and in_process["doc_ids"].dtype == torch.int32
