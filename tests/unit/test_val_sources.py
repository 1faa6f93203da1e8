"""Held-out sources scored one by one: their names, the samples and micro-batches each rank scores, and the logged
`val/<name>/loss`, `val/<name>/bits_per_byte` and token-weighted `val/loss` against a computation by hand."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import cli_here, tiny_overrides

from lit_open.compose import load_train_config
from lit_open.config import DataConfig, SourceConfig, val_source_names
from lit_open.data.datamodule import DataModule, Source, TokenSamples
from lit_open.errors import UserError
from lit_open.train.module import LitLM


def split_copy(split: Path, to: Path, bytes_recorded: bool) -> dict:
    """`split` seen from `to` (its chunks linked, its manifest copied) with the manifest's "bytes", or without."""
    to.mkdir(parents=True)
    for path in split.iterdir():
        if path.name != "manifest.json":
            (to / path.name).symlink_to(path)
    manifest = json.loads((split / "manifest.json").read_text())
    if bytes_recorded:
        assert manifest["bytes"] > 0  # recorded by prepare
    else:
        manifest.pop("bytes", None)
    (to / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def validate_once(cfg) -> tuple[LitLM, DataModule]:
    """One validation in this process, as `lit-open eval` runs it, of a freshly initialised model."""
    module, datamodule = LitLM(cfg), DataModule(cfg.data, cfg.run.seed)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return module, datamodule


def by_hand(module: LitLM, datamodule: DataModule, source: int, picks: list[int]) -> tuple[float, int]:
    """(Summed cross-entropy in nats, tokens) of the model in eval mode over samples `picks` of a val source."""
    samples = TokenSamples(datamodule.val_sources, datamodule.block_size)
    tokens = torch.stack([samples[(source, i, -1, 0, 1)]["tokens"] for i in picks])
    module.model.eval()
    with torch.no_grad():
        logits = module.model(tokens[:, :-1]).float()
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
    return float(loss), tokens[:, 1:].numel()


def test_each_source_is_scored_on_its_samples_and_val_loss_is_their_token_weighted_mean(tiny_data, tmp_path, capsys):
    manifest = split_copy(tiny_data / "val", tmp_path / "code", bytes_recorded=True)
    split_copy(tiny_data / "train", tmp_path / "web", bytes_recorded=False)  # prepared before bytes were counted
    sources = f"[{{path:{tmp_path / 'code'}}},{{path:{tmp_path / 'web'}}}]"  # named after their directories
    overrides = {"data.val_sources": sources, "data.val_samples": 26}  # 13 each: micro-batches of 4, 4, 4 and 1
    module, datamodule = validate_once(load_train_config(tiny_overrides(tiny_data, tmp_path / "run", **overrides)))

    row = module.run.last_metrics
    sums = {}
    for index, (name, picks) in enumerate(zip(("code", "web"), datamodule.val_indices())):
        assert len(picks) == 13
        nats, tokens = sums[name] = by_hand(module, datamodule, index, picks)
        assert abs(row[f"val/{name}/loss"] - nats / tokens) < 1e-6
    total_nats, total_tokens = map(sum, zip(*sums.values()))
    assert abs(row["val/loss"] - total_nats / total_tokens) < 1e-6
    assert row["val/ppl"] == pytest.approx(math.exp(row["val/loss"]))
    bits = row["val/code/loss"] * manifest["tokens"] / (manifest["bytes"] * math.log(2))
    assert abs(row["val/code/bits_per_byte"] - bits) < 1e-6
    assert "val/web/bits_per_byte" not in row
    assert "no val/<name>/bits_per_byte for held-out web:" in capsys.readouterr().err


def test_a_single_source_logs_val_loss_as_before_and_under_its_name(tiny_data, tmp_path):
    cfg = load_train_config(tiny_overrides(tiny_data, tmp_path))  # val source DIR/prepared/val
    module, datamodule = validate_once(cfg)
    total = datamodule.val_sources[0].samples
    assert datamodule.val_indices() == [sorted({round(i * (total - 1) / 15) for i in range(16)})]
    assert module.run.last_metrics["val/prepared/loss"] == module.run.last_metrics["val/loss"]


def fake_datamodule(sizes: list[int], val_samples: int, micro_batch_size: int = 4) -> DataModule:
    datamodule = DataModule(DataConfig(val_samples=val_samples, micro_batch_size=micro_batch_size), seed=0)
    datamodule.val_sources = [Source(Path(f"s{n}"), 1.0, n, None) for n in sizes]
    return datamodule


def test_val_samples_are_shared_equally_and_what_a_small_source_leaves_goes_to_the_others():
    counts = [len(indices) for indices in fake_datamodule([7, 19, 1000], 30).val_indices()]
    assert counts == [7, 11, 12]
    assert [len(indices) for indices in fake_datamodule([1000, 5], 3).val_indices()] == [2, 1]
    assert [len(indices) for indices in fake_datamodule([1000, 5, 9], 1).val_indices()] == [1, 1, 1]  # one each
    assert fake_datamodule([1000], 0).val_indices() == [[]]
    spread = fake_datamodule([101], 5).val_indices()
    assert spread == [[0, 25, 50, 75, 100]]


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_ranks_split_each_source_and_run_the_same_micro_batches_of_one_source_each(world_size):
    datamodule = fake_datamodule([7, 19, 1000], 30)
    picks = datamodule.val_indices()
    per_rank = [datamodule.val_batches(rank, world_size) for rank in range(world_size)]
    scored = []
    for step in zip(*per_rank, strict=True):  # every rank as many micro-batches, each of the same source
        assert len({key[0] for batch in step for key in batch}) == 1
        for batch in step:
            assert 1 <= len(batch) <= 4 and len({key[5] for key in batch}) == 1
            scored += [(key[0], key[1]) for key in batch if key[5]]
    assert sorted(scored) == sorted((s, i) for s, indices in enumerate(picks) for i in indices)  # each once
    assert len(per_rank[0]) == sum(-(-len(indices[::world_size]) // 4) for indices in picks)


def test_a_batch_carries_its_source_and_whether_it_is_scored(tiny_data):
    source = Source(tiny_data / "val", 1.0, 10, None)
    samples = TokenSamples([source, source], 33)
    batch = samples.collate([samples[(1, i, -1, 0, 1, False)] for i in (2, 3)])
    assert (batch["source"], batch["scored"]) == (1, False) and batch["input_ids"].shape == (2, 32)
    assert "source" not in samples.collate([samples[(1, 2, 0, 0, 1)]])  # a training micro-batch mixes sources


def test_manifests_give_bytes_per_token_when_they_record_bytes():
    datamodule = fake_datamodule([5, 5, 5], 3)
    manifests = [{"tokens": 10, "bytes": 35}, {"tokens": 10}, None]  # None: a released format
    for source, manifest in zip(datamodule.val_sources, manifests):
        source.manifest = manifest
    assert datamodule.val_bytes_per_token() == [3.5, None, None]


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ("[{path:/d/web/val},{path:/e/web/train}]", "data.val_sources[1].name='web' (from path /e/web/train) is also "),
        ("[{path:/d/a,name:x},{path:/d/b,name:x}]", "data.val_sources[1].name='x' is also data.val_sources[0]'s name"),
        ("[{path:/d/a,name:'a b'}]", "data.val_sources[0].name='a b' is not a valid name"),
    ],
)
def test_clashing_or_invalid_names_are_refused_naming_the_key(tiny_data, tmp_path, sources, message):
    overrides = tiny_overrides(tiny_data, tmp_path, **{"data.val_sources": sources})
    with pytest.raises(UserError, match=re.escape(message)):
        load_train_config(overrides)


def test_a_clash_exits_2_through_the_cli(tiny_data, tmp_path):
    overrides = tiny_overrides(tiny_data, tmp_path, **{"data.val_sources": "[{path:/d/a,name:x},{path:/d/b,name:x}]"})
    result = cli_here("train", *overrides)
    assert result.returncode == 2 and "data.val_sources[1].name='x'" in result.stderr


def test_names_given_or_derived_from_the_paths():
    paths = ["/d/web/val", "/d/code/train/", "~/pile/document", "rel/books.jsonl", "val"]
    data = DataConfig(val_sources=[SourceConfig(path=p) for p in paths] + [SourceConfig(path="/d/x", name="mine")])
    assert val_source_names(data) == ["web", "code", "document", "books.jsonl", "val", "mine"]
