"""`lit-open prepare` from Hugging Face datasets (hub cache, save_to_disk, data-file directories), per-input held-out
splits, and the UTF-8 bytes each manifest records. No network: hub datasets come from a huggingface_hub cache."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import datasets
import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cli_here
from litdata import StreamingDataset, TokensLoader

from lit_open.data import hf_datasets
from lit_open.data.manifest import read_manifest
from lit_open.data.readers import discover, input_names, is_held_out, read_input
from lit_open.data.tokenizer import load_tokenizer
from lit_open.errors import UserError

MAIN, V1 = "a" * 40, "b" * 40  # the commits the cached hub dataset's main branch and tag v1 point at
# Non-ASCII text of 2-, 3- and 4-byte characters: bytes differ from characters. None and "" are rows, not documents.
BOOKS = [f"Kapitel {i}: über Café, 日本語 {'🙂' * (i % 3)}." if i % 7 else None for i in range(40)] + ["", "naïve"]


def _hub_texts(commit: str, shard: int) -> list[str]:
    return [f"{commit[0]} shard {shard} row {r}: λ → {'é' * r}" for r in range(12)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A hub cache holding org/tiny at two commits (main, v1), a saved Dataset in 2 arrow files, a saved
    DatasetDict, and a directory of parquet files named by split."""
    root = tmp_path_factory.mktemp("datasets")
    repo = root / "hub" / "datasets--org--tiny"
    for commit in (MAIN, V1):
        files = repo / "snapshots" / commit / "data"
        files.mkdir(parents=True)
        for shard in range(2):
            table = pa.table({"text": _hub_texts(commit, shard), "n": list(range(12))})
            pq.write_table(table, files / f"train-0000{shard}-of-00002.parquet")
        pq.write_table(pa.table({"text": ["a test row"], "n": [0]}), files / "test-00000-of-00001.parquet")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(V1)
    datasets.Dataset.from_dict({"text": BOOKS}).save_to_disk(str(root / "books"), num_shards=2)
    splits = {"train": ["t1", "t2"], "test": ["x1", None, "x2"]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(
        str(root / "dict")
    )
    shutil.copytree(repo / "snapshots" / MAIN, root / "web")
    return root


def _isolate(mp: pytest.MonkeyPatch, data: Path) -> None:
    """Offline, the hub cache above, and the `datasets` cache (lock files of local loads) in the test's directory:
    here and in prepare's worker processes (which read the environment when they import the libraries)."""
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(data / "hub"))
    mp.setenv("HF_DATASETS_CACHE", str(data / "datasets-cache"))
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", data / "datasets-cache")


@pytest.fixture
def offline(data, monkeypatch):
    _isolate(monkeypatch, data)


def _stream(split_dir: Path) -> list[int]:
    ds = StreamingDataset(str(split_dir), item_loader=TokensLoader(block_size=1), shuffle=False)
    return [int(t) for x in ds for t in x]


def _expected(docs: list[str], tok, eos_id: int) -> list[int]:
    return [t for text in docs for t in [*tok.encode(text, add_special_tokens=False).ids, eos_id]]


def _shards(data: Path) -> dict[str, list[tuple[str, list[str | None]]]]:
    """Per input of `prepared`: (key, rows) of each shard, by the documented rule (arrow files; data files)."""
    books = [
        (f"books#{i}", datasets.Dataset.from_file(str(f))["text"])
        for i, f in enumerate(sorted((data / "books").glob("data-*.arrow")))
    ]
    hub = [(f"org/tiny:train#{i}", _hub_texts(V1, i)) for i in range(2)]
    return {"books": books, "tiny": hub}


def _docs(shards: list[tuple[str, list[str | None]]], held_out: bool) -> list[str]:
    return [t for key, rows in shards for i, t in enumerate(rows) if t and is_held_out(key, i, 0.3) == held_out]


@pytest.fixture(scope="module")
def prepared(data, tmp_path_factory):
    """A saved Dataset (given as a plain directory) and a cached hub dataset at tag v1, offline, a BPE trained on
    them, and one held-out split per input."""
    out = tmp_path_factory.mktemp("prepared") / "data"
    mp = pytest.MonkeyPatch()
    _isolate(mp, data)
    try:
        result = cli_here(
            "prepare",
            f"inputs=[{data / 'books'},hf-dataset:org/tiny@v1]",
            f"output={out}",
            "vocab_size=300",
            "val_fraction=0.3",
            "val_by_input=true",
            "num_workers=1",
        )
    finally:
        mp.undo()
    assert result.returncode == 0, result.stderr
    return out, result.stderr


def test_dataset_inputs_are_tokenized_in_shard_order_with_per_input_val_splits(prepared, data):
    out, _ = prepared
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "train", "val-books", "val-tiny"]
    tok = load_tokenizer(out)
    eos = tok.token_to_id("<|endoftext|>")
    shards = _shards(data)
    train = _docs(shards["books"], False) + _docs(shards["tiny"], False)
    assert _stream(out / "train") == _expected(train, tok, eos)
    for name in ("books", "tiny"):
        held = _docs(shards[name], True)
        assert held and _stream(out / f"val-{name}") == _expected(held, tok, eos)
        m = read_manifest(out / f"val-{name}")
        assert m["split"] == f"val-{name}" and [s["name"] for s in m["sources"]] == [name]
        assert m["documents"] == len(held) and m["val_by_input"] is True


def test_manifest_records_revisions_and_exact_utf8_bytes(prepared, data):
    out, _ = prepared
    shards = _shards(data)
    fingerprint = json.loads((data / "books" / "state.json").read_text())["_fingerprint"]
    for split, held_out in (("train", False), ("val-books", True), ("val-tiny", True)):
        m = read_manifest(out / split)
        by_input = {s["name"]: s for s in m["sources"]}
        for name, source in by_input.items():
            docs = _docs(shards[name], held_out)
            assert source["bytes"] == sum(len(t.encode("utf-8")) for t in docs) and source["documents"] == len(docs)
            assert source["revision"] == {"books": fingerprint, "tiny": V1}[name]
            assert source["files"] == 2  # shards
        assert m["bytes"] == sum(s["bytes"] for s in m["sources"]) > sum(s["documents"] for s in m["sources"])
    books = read_manifest(out / "val-books")
    assert books["bytes"] > sum(len(t) for t in _docs(shards["books"], True))  # non-ASCII: more bytes than chars


def test_prepare_prints_the_val_sources_override(prepared):
    out, stderr = prepared
    line = re.sub(r"\s+", "", stderr.split("by name:")[1])  # rich may wrap the line
    assert line.startswith(
        f"'data.val_sources=[{{path:{out}/val-books,name:books}},{{path:{out}/val-tiny,name:tiny}}]'"
    )


def test_saved_dataset_dict_and_parquet_directory_splits(data, offline):
    (saved, parquet, main) = discover(
        [f"hf-dataset:{data / 'dict'}:test", f"hf-dataset:{data / 'web'}:test", "hf-dataset:org/tiny"]
    )
    assert [f.key for f in saved] == ["dict:test#0"] and [f.key for f in parquet] == ["web:test#0"]
    assert list(read_input(saved[0])) == [(0, "x1"), (2, "x2")]
    assert list(read_input(parquet[0])) == [(0, "a test row")] and parquet[0].revision is None
    assert [f.key for f in main] == ["org/tiny:train#0", "org/tiny:train#1"] and main[0].revision == MAIN
    assert [t for _, t in read_input(main[1])] == _hub_texts(MAIN, 1)
    (default,) = discover([str(data / "dict")])  # a DatasetDict directory given plainly: its train split
    assert [t for f in default for _, t in read_input(f)] == ["t1", "t2"]


def test_input_names():
    specs = [
        "a/x.jsonl",
        "b/x.jsonl.gz",
        "hf-dataset:org/x/en@v1:validation",
        "stdlib",
        "data/web/*.txt",
        "hf-dataset:org/x:train",
        "c/x",
        "my corpus.txt",
    ]
    assert input_names(specs) == ["x", "x-2", "x-en-validation", "stdlib", "web", "x-3", "x-4", "my_corpus"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["inputs=[hf-dataset:org/tiny@nope]"],
            r"org/tiny at revision nope is not in the huggingface_hub cache .*"
            r"holds the revisions main, v1.*hf download org/tiny --repo-type dataset --revision nope",
        ),
        (["inputs=[hf-dataset:org/absent]"], r"org/absent at revision main is not in the huggingface_hub cache"),
        (["inputs=[hf-dataset:org/tiny:nope]"], r"has no split 'nope'; its splits: train, test"),
        (["inputs=[hf-dataset:org/tiny]", "text_key=body"], r"has no column 'body' \(its columns: text, n\)"),
        (["inputs=[hf-dataset:org/tiny]", "text_key=n"], r"column 'n' holds Value\(.*int64.*\), not text"),
        (["inputs=[hf-dataset:tiny]"], r"'hf-dataset:tiny' is not a dataset input.*ORG/NAME"),
        (["inputs=[hf-dataset:org/tiny]", "val_by_input=true"], r"val_by_input=true .* needs val_fraction"),
        (["inputs=[hf-dataset:DATA/books:train]"], r"holds one saved Dataset.*no split 'train'"),
        (["inputs=[hf-dataset:DATA/dict:validation]"], r"no split 'validation'; its splits: train, test"),
    ],
)
def test_bad_dataset_inputs_exit_2_naming_the_cause(data, offline, tmp_path, args, message):
    args = [a.replace("DATA", str(data)) for a in args]
    result = cli_here("prepare", *args, f"output={tmp_path / 'o'}", "num_workers=1")
    assert result.returncode == 2, result.stderr
    assert re.search(message, " ".join(result.stderr.split())), result.stderr
    assert not (tmp_path / "o").exists()


def _hub_error(cls):
    err = cls.__new__(cls)  # hub errors take an HTTP response; the message is all these tests need
    Exception.__init__(err, "404")
    return err


def test_online_hub_dataset_reads_the_resolved_commit(data, monkeypatch):
    """With the hub reachable, the revision is resolved to a commit first and load_dataset reads that commit."""
    calls = []

    def dataset_info(self, repo, revision=None):
        if revision == "nope":
            raise _hub_error(huggingface_hub.errors.RevisionNotFoundError)
        if repo != "org/tiny":
            raise _hub_error(huggingface_hub.errors.RepositoryNotFoundError)
        return type("Info", (), {"sha": V1})()

    load = datasets.load_dataset

    def load_dataset(path, name=None, revision=None, **kwargs):
        calls.append((path, name, revision))
        return load(str(data / "hub" / "datasets--org--tiny" / "snapshots" / revision), **kwargs)

    _isolate(monkeypatch, data)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    (files,) = discover(["hf-dataset:org/tiny/default@v1"])
    assert calls == [("org/tiny", "default", V1)]
    assert [f.key for f in files] == ["org/tiny/default:train#0", "org/tiny/default:train#1"]
    assert files[0].revision == V1 and files[0].dataset.revision == V1
    with pytest.raises(UserError, match=r"'hf-dataset:org/tiny@nope': the dataset org/tiny has no revision 'nope'"):
        discover(["hf-dataset:org/tiny@nope"])
    with pytest.raises(UserError, match=r"the hub has no dataset 'org/other'"):
        discover(["hf-dataset:org/other"])
    assert hf_datasets.input_name("hf-dataset:org/tiny/default@v1") == "tiny-default"
