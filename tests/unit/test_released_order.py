"""Publishers' orders (lit_open.data.released_order) against their own code or a simulation of the cited code.

Pythia: megatron-core's IndexedDataset read as pythia's utils/batch_viewer.py does (items [1024 s, 1024 (s+1))).
OLMo: global indices made by OLMo's and OLMo-core's own code (tests/data/olmo_orders.npz, tests/tools/
make_olmo_orders.py). Amber: amber-train's chunk loop (main.py#L143-L177, main_utils.py#L15-L33) simulated rank by
rank, as its processes read their lines.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from lit_open.config import DataConfig, SourceConfig
from lit_open.data.datamodule import TokenSamples, open_sources, released_order_of
from lit_open.data.released_order import (
    ChunkOrder,
    OlmoOrder,
    revision_position,
    start_from_revision,
)
from lit_open.errors import UserError
from tests.unit.test_released_data import BLOCK, tokens, write_jsonl, write_mmidx

ORACLES = Path(__file__).parent.parent / "data" / "olmo_orders.npz"


def batch_tokens(order, sources, step: int) -> np.ndarray:
    samples = TokenSamples(sources, BLOCK)
    return np.stack([samples[(int(s), int(i), 0, 0, 1)]["tokens"].numpy() for s, i in order.global_batch(step)])


def test_sequential_order_is_pythias_batches_read_with_megatron_core(tmp_path):
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    data = tokens(100)
    write_mmidx(tmp_path / "pile_a", data[:37])
    write_mmidx(tmp_path / "pile_b", data[37:])
    write_mmidx(tmp_path / "whole", data)
    config = DataConfig(
        sources=[
            SourceConfig(path=str(tmp_path / "pile_a"), format="megatron"),
            SourceConfig(path=str(tmp_path / "pile_b"), format="megatron"),
        ],
        seq_len=BLOCK - 1,
        global_batch_size=8,
        micro_batch_size=8,
        order="sequential",
        start_step=3,
    )
    sources = open_sources(config.sources, BLOCK, "data.sources")
    order = released_order_of(config, sources, seed=0)
    assert order.steps == 100 // 8  # the last 4 items make no full batch
    reference = indexed.IndexedDataset(str(tmp_path / "whole"))
    for run_step in range(order.steps - 3):
        released = 3 + run_step
        expected = np.stack([np.asarray(reference[i]) for i in range(8 * released, 8 * (released + 1))])
        assert np.array_equal(batch_tokens(order, sources, run_step), expected)
    del reference
    with pytest.raises(UserError, match=r"ends after released step 12 .*asked for step 12"):
        order.global_batch(9)
    assert order.steps_of(1, 10) == [(37 + 10) // 8]


def test_a_pythia_revision_starts_the_data_after_its_step():
    assert revision_position("step3000") == ("step", 3000)
    assert revision_position("stage1-step1907359-tokens4001B") == ("step", 1907359)
    assert revision_position("stage2-ingredient1-step23852-tokens50B") is None  # names no position of one order
    assert revision_position("ckpt_120") == ("chunk", 120)
    assert revision_position("main") is None
    assert start_from_revision("step3000", "sequential", [("document.idx", 10**6)], 1024) == 3000
    assert start_from_revision(None, "olmo", [("a.npy", 10)], 2) == 0
    # Amber: 1,706,976 lines per chunk file, 2240 per step: 762 steps per chunk, ckpt_120 after chunk 120; the
    # chunks after it are enough
    amber = [(f"train_{k:03d}.jsonl", 1706976) for k in range(121, 360)]
    assert start_from_revision("ckpt_120", "llm360", amber, 2240) == 92_202
    with pytest.raises(UserError, match=r"ckpt_3.*only data.order=llm360.*data.start_step"):
        start_from_revision("ckpt_3", "sequential", [("a", 10)], 2)
    with pytest.raises(UserError, match=r"the same number, at least 1, for every file \(a.jsonl: 10 lines, b.jsonl: 4"):
        start_from_revision("ckpt_0", "llm360", [("a.jsonl", 10), ("b.jsonl", 4)], 3)


def olmo_cases() -> list[tuple[dict, np.ndarray]]:
    if not ORACLES.exists():
        pytest.skip(f"{ORACLES} is missing: run tests/tools/make_olmo_orders.py")
    stored = np.load(ORACLES)
    return [(case, stored[case["name"]]) for case in map(json.loads, stored["cases"])]


def test_olmo_order_is_the_global_indices_of_olmo_and_olmo_core():
    cases = olmo_cases()
    assert len(cases) == 5  # old OLMo epochs 0 and 1 (with and without drop_last), OLMo-core epochs 1 and 2
    for case, indices in cases:
        n, seed, batch = case["n"], case["seed"], 64
        first_epoch = {"ai2-olmo": 0, "ai2-olmo-core": 1}[case["publisher"]]
        order = OlmoOrder([n // 3, n - n // 3], batch, 0, seed, first_epoch)
        epoch = case["epoch"] - first_epoch  # the epoch of this order, counted from 0
        steps = order.steps_per_epoch
        assert steps == n // batch
        for step in list(range(0, steps, 7)) + [steps - 1]:
            got = order.global_batch(epoch * steps + step)
            flat = np.where(got[:, 0] == 0, got[:, 1], got[:, 1] + n // 3)
            assert np.array_equal(flat, indices[step * batch : (step + 1) * batch].astype(np.int64)), (case, step)


def test_olmo_order_replays_a_global_indices_file_and_refuses_a_foreign_one(tmp_path):
    indices = np.random.default_rng(0).permutation(50).astype(np.uint32)
    indices.tofile(tmp_path / "global_indices.npy")  # raw, as OLMo writes it through np.memmap
    order = OlmoOrder([50], 8, 2, seed=1, global_indices=str(tmp_path / "global_indices.npy"))
    assert order.steps == 6
    assert order.global_batch(1)[:, 1].tolist() == indices[24:32].tolist()
    assert order.steps_of(0, int(indices[40])) == [5]
    np.save(tmp_path / "standard.npy", indices.astype(np.uint64))
    assert (
        OlmoOrder([50], 8, 0, 1, global_indices=str(tmp_path / "standard.npy")).global_batch(0)[:, 1].tolist()
        == indices[:8].tolist()
    )
    with pytest.raises(UserError, match=r"names instance 49, but data.sources hold 40 instances"):
        OlmoOrder([40], 8, 0, 1, global_indices=str(tmp_path / "global_indices.npy"))
    with pytest.raises(UserError, match="does not exist"):
        OlmoOrder([40], 8, 0, 1, global_indices=str(tmp_path / "none.npy"))


def test_olmo_epochs_follow_each_other_and_locate_finds_every_epoch():
    order = OlmoOrder([20], 6, 0, seed=5, first_epoch=1)
    assert order.steps_per_epoch == 3 and order.steps is None
    for epoch in range(3):
        expected = np.arange(20, dtype=np.uint32)
        np.random.Generator(np.random.PCG64(5 + 1 + epoch)).shuffle(expected)
        got = np.concatenate([order.global_batch(epoch * 3 + k)[:, 1] for k in range(3)])
        assert got.tolist() == expected[:18].tolist()
    first = order.global_batch(4)[0, 1]
    assert 4 in order.steps_of(0, int(first), epochs=2)


def amber_train_steps(chunk_lines: list[int], last_ckpt: int, world: int, per_device: int) -> dict[int, list[set]]:
    """amber-train's loop, process by process: after `np.random.seed(11111 + last_ckpt + 1)` (fabric's
    seed_everything), every chunk from last_ckpt + 1 on draws `np.random.permutation(n_examples)`, truncates it to
    a multiple of the global micro-batch, and rank r trains its lines [r::world] in micro-batches of per_device."""
    np.random.seed(11111 + last_ckpt + 1)
    global_micro = per_device * world
    steps = {}
    for chunk in range(last_ckpt + 1, len(chunk_lines)):
        idxes = np.random.permutation(chunk_lines[chunk])
        n = chunk_lines[chunk] // global_micro * global_micro
        per_rank = [idxes[rank:n:world] for rank in range(world)]
        steps[chunk] = [
            {int(line) for rank in range(world) for line in per_rank[rank][i : i + per_device]}
            for i in range(0, len(per_rank[0]), per_device)
        ]
    return steps


@pytest.mark.parametrize("last_ckpt", [-1, 1])
def test_llm360_amber_shuffle_is_amber_trains_draw(last_ckpt):
    lines = [53, 50, 59, 49]  # 4 steps of 12 each, 5, 2, 11 and 1 lines never trained
    reference = amber_train_steps(lines, last_ckpt, world=3, per_device=4)
    files = [(f"train_{k}.jsonl", n) for k, n in enumerate(lines)]
    start = start_from_revision(f"ckpt_{last_ckpt}" if last_ckpt >= 0 else None, "llm360", files, 12)
    order = ChunkOrder([sum(lines)], lines, [name for name, _ in files], 12, start, shuffle="amber")
    offsets = np.concatenate([[0], np.cumsum(lines)])
    run_step = 0
    for chunk in range(last_ckpt + 1, len(lines)):
        for expected in reference[chunk]:
            got = order.global_batch(run_step)[:, 1] - offsets[chunk]
            assert sorted(got.tolist()) == sorted(expected), (chunk, run_step)
            assert all(0 <= line < lines[chunk] for line in got)
            run_step += 1
    assert start + run_step == order.steps == sum(n // 12 for n in lines)
    line = int(order.global_batch(5)[3, 1])
    assert order.steps_of(0, line) == [start + 5]


def test_llm360_file_order_trains_each_chunk_in_line_order(tmp_path):
    (tmp_path / "amber").mkdir()
    for k, n in [(3, 10), (4, 9), (5, 11)]:  # the chunks after ckpt_2
        write_jsonl(tmp_path / "amber" / f"train_{k:03d}.jsonl", tokens(n, start=100 * k))
    config = DataConfig(
        sources=[SourceConfig(path=str(tmp_path / "amber"), format="llm360")],
        seq_len=BLOCK - 1,
        global_batch_size=3,
        micro_batch_size=3,
        order="llm360",
        start_step=9,
    )
    sources = open_sources(config.sources, BLOCK, "data.sources")
    order = released_order_of(config, sources, seed=0)
    assert order.steps == 18 and order.data_steps == 9  # chunks 3-5 of 3 steps each, from released step 9 on
    # released step 9 is chunk 3's first batch: lines 0-2 of train_003.jsonl
    assert np.array_equal(batch_tokens(order, sources, 0), tokens(10, start=300)[:3])
    assert [sources[0].locate(int(i)) for _, i in order.global_batch(4)] == [("train_004.jsonl", k) for k in (3, 4, 5)]
    assert order.steps_of(0, 10 + 4) == [13]
    assert order.steps_of(0, 10 + 9 + 10) == []  # train_005 line 10: past the chunk's last full batch, never trained
    gap = released_order_of(dataclasses.replace(config, start_step=0), sources, seed=0)
    assert gap.data_steps == 0  # chunks 0-2 are not in data.sources: nothing can be trained from step 0


def test_released_orders_refuse_what_they_cannot_replay():
    from lit_open.compose import load_train_config

    src = "data.sources=[{path:/d,format:llm360}]"
    with pytest.raises(UserError, match=r"data.sources\[0\].weight=2.0: data.order=sequential reads the sources one"):
        load_train_config(["data.sources=[{path:/d,format:megatron,weight:2.0}]", "data.order=sequential"])
    with pytest.raises(UserError, match=r"data.order_seed=6198 applies to data.order=olmo, not data.order=mixture"):
        load_train_config([src, "data.order_seed=6198"])
    with pytest.raises(UserError, match=r"data.chunk_shuffle=amber applies to data.order=llm360"):
        load_train_config([src, "data.order=olmo", "data.chunk_shuffle=amber"])
    with pytest.raises(UserError, match=r"data.order='pythia'.*mixture, sequential, olmo, llm360"):
        load_train_config([src, "data.order=pythia"])
    with pytest.raises(UserError, match=r"format=litdata, but data.order=llm360"):
        load_train_config(["data.sources=[{path:/d}]", "data.order=llm360"])
    root = load_train_config([src, "data.root=/released/amber", "data.sources=[{path:train,format:llm360}]"])
    assert root.data.sources[0].path == "/released/amber/train"


def test_a_start_past_the_data_stops_at_start_up(tiny_data, tmp_path):
    from tests.conftest import cli_here, tiny_overrides

    (tmp_path / "amber").mkdir()
    for k in range(3):
        write_jsonl(tmp_path / "amber" / f"train_{k}.jsonl", tokens(8, block=33, start=k) % 500)
    overrides = tiny_overrides(
        tiny_data,
        tmp_path / "run",
        **{
            "data.sources": f"[{{path:{tmp_path / 'amber'},format:llm360}}]",
            "data.order": "llm360",
            "data.global_batch_size": 4,
            "data.micro_batch_size": 4,
            "trainer.max_steps": 3,
        },
    )
    result = cli_here("train", *overrides, "data.start_step=4")
    assert result.returncode == 2
    assert (
        "data.start_step=4 (from data.start_step) leaves too few global batches in the data: data.order=llm360 over "
        "data.sources gives 6 global batches of 4, and this run needs released steps 4-6 (trainer.max_steps=3). "
        "Lower trainer.max_steps to 2" in result.stderr.replace("\n", " ")
    )
    result = cli_here("train", *overrides, "data.start_step=6")
    assert result.returncode == 2 and "is past the end of the data" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["recipe=amber_7b_continue", "data.root=/a"],
            {
                "order": "llm360",
                "chunk_shuffle": "amber",
                "global_batch_size": 2240,
                "seq_len": 2048,
                "path": "/a/train",
            },
        ),
        (
            ["recipe=pythia_160m", "data=pythia", "data.root=/p"],
            {"order": "sequential", "global_batch_size": 1024, "seq_len": 2048, "path": "/p/document"},
        ),
        (
            ["recipe=olmo2_1b", "data=olmo2_1b_stage1", "data.root=/o"],
            {"order": "olmo", "order_seed": 6198, "global_batch_size": 512, "seq_len": 4096, "path": "/o/stage1.txt"},
        ),
        (
            ["recipe=olmo2_1b_midtrain", "data=olmo2_1b_stage2", "data.root=/o"],
            {"order": "olmo", "order_seed": 42, "start_step": 0, "global_batch_size": 512, "path": "/o/stage2.txt"},
        ),
    ],
)
def test_recipes_replay_their_released_data_with_the_presets(overrides, expected):
    from lit_open.compose import load_train_config

    cfg = load_train_config(overrides)
    data = {**dataclasses.asdict(cfg.data), "path": cfg.data.sources[0].path}
    assert {key: data[key] for key in expected} == expected
    # the publisher's schedule, with its length, so that a start from a released step continues it
    assert cfg.schedule.total_steps is not None or cfg.schedule.name == "constant"


def test_data_show_and_locate_read_a_released_layout_without_a_run(tmp_path):
    from lit_open.commands.data import data_command

    data = tokens(40) % 1000
    write_mmidx(tmp_path / "document", data)
    layout = [
        f"data.sources=[{{path:{tmp_path / 'document'},format:megatron}}]",
        "data.order=sequential",
        "data.global_batch_size=4",
        "data.micro_batch_size=4",
        f"data.seq_len={BLOCK - 1}",
        "data.tokenizer=null",  # none beside the files either: samples are shown as token ids
    ]
    shown = data_command(["show", *layout, "released_step=3", "samples=0"])
    assert shown["samples"] == [[0, i] for i in range(12, 16)]
    assert shown["shown"][0]["file"] == ("document.bin", 12) and shown["shown"][0]["text"] is None  # no tokenizer
    found = data_command(["locate", *layout, "file=document.idx", "index=13"])
    assert found["released_steps"] == [3] and found["data_steps"] == [3]
    with pytest.raises(UserError, match=r"file='train_1.jsonl' is not a file of data.sources"):
        data_command(["locate", *layout, "file=train_1.jsonl", "index=0"])
