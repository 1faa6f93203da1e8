"""`lit-open prepare`: inputs -> tokenizer -> litdata token chunks + manifests (numbers checked, not just shapes)."""

from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import cli_here
from litdata import StreamingDataset, TokensLoader
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from lit_open.config import PrepareConfig
from lit_open.data import pieces
from lit_open.data import prepare as prep
from lit_open.data.manifest import read_manifest
from lit_open.data.prepare import prepare
from lit_open.data.readers import STDLIB_SKIP, InputFile, discover, is_held_out, iter_documents, stdlib_files
from lit_open.data.tokenizer import load_tokenizer, resolve_eos, token_dtype, train_bpe
from lit_open.errors import UserError

WORDS = "the a lit open model token data train value loss step chunk über café 日本 naïve λ → 🙂".split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + rng.choice([".", "!\n", "\n\n"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Four inputs (a directory, a parquet file, a jsonl.gz file, a glob) and the documents each must yield.

    `expected[s]` lists (key, record index, text) of input s in the order prepare must write them.
    """
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    expected: list[list[tuple[str, int, str]]] = [[], [], [], []]

    d = root / "dir"
    (d / "sub").mkdir(parents=True)
    lines, index = [], 0
    for i in range(120):
        if i == 7:
            lines.append("")  # a blank line is no record
            continue
        text = "" if i == 11 else (None if i == 12 else _text(rng, rng.randint(3, 40)))
        lines.append(json.dumps({"id": i, "text": text}))
        if text:
            expected[0].append(("a.jsonl", index, text))
        index += 1
    (d / "a.jsonl").write_text("\n".join(lines) + "\n")
    for name in ("sub/b.txt", "sub/c.md"):
        text = _text(rng, 60)
        (d / name).write_text(text)
        expected[0].append((name, 0, text))
    (d / "notes.csv").write_text("not,taken\n")  # not a document suffix: skipped in directories
    (d / ".hidden.txt").write_text("hidden files are skipped")
    expected[0].sort(key=lambda e: e[0])  # files in sorted order, documents in file order (sort is stable)

    extra = root / "extra"
    extra.mkdir()
    texts = [_text(rng, rng.randint(1, 30)) for _ in range(80)]
    texts[5] = None
    pq.write_table(pa.table({"text": texts, "n": list(range(80))}), extra / "d.parquet", row_group_size=17)
    expected[1] = [("d.parquet", i, t) for i, t in enumerate(texts) if t]
    gz_texts = [_text(rng, rng.randint(1, 30)) for _ in range(50)]
    with gzip.open(extra / "e.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in gz_texts)
    expected[2] = [("e.jsonl.gz", i, t) for i, t in enumerate(gz_texts)]

    g = root / "globbed"
    g.mkdir()
    for i in range(6):
        text = "" if i == 3 else _text(rng, 25)
        (g / f"g{i}.txt").write_text(text)
        if text:
            expected[3].append((f"g{i}.txt", 0, text))
    (g / "skip.md").write_text("not matched by the glob")

    inputs = [str(d), str(extra / "d.parquet"), str(extra / "e.jsonl.gz"), str(g / "*.txt")]
    return root, inputs, expected


@pytest.fixture(scope="module")
def tokenizer_path(corpus, tmp_path_factory):
    _, _, expected = corpus
    tok = train_bpe([t for source in expected for _, _, t in source], vocab_size=300)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def _read_stream(split_dir: Path) -> np.ndarray:
    ds = StreamingDataset(str(split_dir), item_loader=TokensLoader(block_size=1), shuffle=False)
    return np.concatenate([np.asarray(x) for x in ds])


def _expected_stream(tok, docs: list[str], eos_id: int) -> list[int]:
    out: list[int] = []
    for text in docs:
        out.extend(tok.encode(text, add_special_tokens=False).ids)
        out.append(eos_id)
    return out


def _split_docs(expected, val_fraction: float, split: str) -> list[list[tuple[str, int, str]]]:
    return [[e for e in source if is_held_out(e[0], e[1], val_fraction) == (split == "val")] for source in expected]


@pytest.fixture(scope="module")
def prepared(corpus, tokenizer_path, tmp_path_factory):
    """One prepare with all reader kinds, a given tokenizer file, a val split and two worker processes."""
    _, inputs, _ = corpus
    out = tmp_path_factory.mktemp("prepared") / "data"
    original = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("forkserver", force=True)  # litdata forces "spawn"; prepare must undo it
    sigint = signal.getsignal(signal.SIGINT)
    env = {k: v for k, v in os.environ.items() if k.startswith("DATA_OPTIMIZER")}
    try:
        cfg = PrepareConfig(
            inputs=inputs,
            output=str(out),
            tokenizer=str(tokenizer_path),
            val_fraction=0.3,
            num_workers=2,
            chunk_tokens=1000,
        )
        mp = pytest.MonkeyPatch()
        # The corpus is tiny: make its train split take the 2-worker (ordered) path anyway, and the val split
        # (0.3 of the bytes) one worker, which is quicker (a worker process takes ~2 s to start).
        total = sum(f.size for source in discover(inputs) for f in source)
        mp.setattr(prep, "_BYTES_PER_WORKER", int(total * 0.6))
        try:
            result = prepare(cfg)
        finally:
            mp.undo()
        after = multiprocessing.get_start_method(allow_none=True)
        sigint_after = signal.getsignal(signal.SIGINT)
        env_after = {k: v for k, v in os.environ.items() if k.startswith("DATA_OPTIMIZER")}
    finally:
        multiprocessing.set_start_method(original, force=True)
    return {
        "out": out,
        "result": result,
        "start_method": after,
        "sigint": (sigint, sigint_after),
        "env": (env, env_after),
    }


def test_prepare_layout_and_process_state(prepared, tokenizer_path):
    out = prepared["out"]
    assert prepared["result"] == out
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "train", "val"]
    assert (out / "tokenizer.json").read_bytes() == tokenizer_path.read_bytes()
    assert not list(out.parent.glob("data.tmp-*"))
    assert prepared["start_method"] == "forkserver"  # restored after litdata's set_start_method("spawn", force=True)
    assert prepared["sigint"][0] is prepared["sigint"][1]  # litdata's os._exit(0) SIGINT handler is removed again
    assert prepared["env"][0] == prepared["env"][1]  # litdata's DATA_OPTIMIZER_* variables are undone
    assert len(list((out / "train").glob("chunk-1-*.bin"))) > 0  # two workers wrote


@pytest.mark.parametrize("split", ["train", "val"])
def test_token_stream_is_every_document_in_order_with_eos(prepared, corpus, tokenizer_path, split):
    _, _, expected = corpus
    tok = load_tokenizer(tokenizer_path)
    eos_id = tok.token_to_id("<|endoftext|>")
    docs = [t for source in _split_docs(expected, 0.3, split) for _, _, t in source]
    stream = _read_stream(prepared["out"] / split)
    assert stream.dtype == np.uint16
    assert stream.tolist() == _expected_stream(tok, docs, eos_id)
    assert int((stream == eos_id).sum()) == len(docs)  # EOS after every document, and nowhere else
    assert tok.decode(stream[: stream.tolist().index(eos_id)].tolist()) == docs[0]  # byte-level round trip


def test_manifest_counts_match_direct_tokenization(prepared, corpus, tokenizer_path):
    _, inputs, expected = corpus
    tok = load_tokenizer(tokenizer_path)
    for split in ("train", "val"):
        m = read_manifest(prepared["out"] / split)
        assert m["format"] == "lit-open-tokens/1" and m["split"] == split and m["dtype"] == "uint16"
        assert m["tokenizer"] == {
            "sha256": hashlib.sha256(tokenizer_path.read_bytes()).hexdigest(),
            "vocab_size": tok.get_vocab_size(),
            "eos_token": "<|endoftext|>",
            "eos_id": 0,
        }
        assert m["val_fraction"] == 0.3 and m["text_key"] == "text" and m["created"] and m["lit_open_version"]
        sources = _split_docs(expected, 0.3, split)
        assert [s["input"] for s in m["sources"]] == inputs
        assert [s["files"] for s in m["sources"]] == [3, 1, 1, 6]
        assert [s["documents"] for s in m["sources"]] == [len(s) for s in sources]
        assert [s["tokens"] for s in m["sources"]] == [
            sum(len(tok.encode(t).ids) + 1 for _, _, t in source) for source in sources
        ]
        assert m["documents"] == sum(s["documents"] for s in m["sources"])
        assert m["tokens"] == sum(s["tokens"] for s in m["sources"]) == len(_read_stream(prepared["out"] / split))
        # UTF-8 bytes of the documents' text (the corpus has 2-, 3- and 4-byte characters)
        assert [s["bytes"] for s in m["sources"]] == [sum(len(t.encode()) for _, _, t in s) for s in sources]
        assert m["bytes"] == sum(s["bytes"] for s in m["sources"]) > sum(len(t) for s in sources for _, _, t in s)
        assert [s["revision"] for s in m["sources"]] == [None] * 4 and m["val_by_input"] is False


def test_val_split_is_disjoint_deterministic_and_near_the_fraction(prepared, corpus):
    _, _, expected = corpus
    train = {(k, i) for source in _split_docs(expected, 0.3, "train") for k, i, _ in source}
    val = {(k, i) for source in _split_docs(expected, 0.3, "val") for k, i, _ in source}
    assert train.isdisjoint(val) and len(train) + len(val) == sum(len(s) for s in expected)
    m_train, m_val = read_manifest(prepared["out"] / "train"), read_manifest(prepared["out"] / "val")
    assert (m_train["documents"], m_val["documents"]) == (len(train), len(val))
    # the hash itself: stable, and close to the fraction over many documents
    held = [is_held_out(f"file{i % 7}.jsonl", i, 0.05) for i in range(20_000)]
    assert held == [is_held_out(f"file{i % 7}.jsonl", i, 0.05) for i in range(20_000)]
    assert 0.045 < sum(held) / len(held) < 0.055
    assert not any(is_held_out("x", i, 0.0) for i in range(1000))


def test_readers_parquet_gzip_json_array_and_text(corpus, tmp_path):
    root, _, expected = corpus
    assert [(i, t) for i, t in iter_documents(root / "extra" / "d.parquet")] == [(i, t) for _, i, t in expected[1]]
    assert [(i, t) for i, t in iter_documents(root / "extra" / "e.jsonl.gz")] == [(i, t) for _, i, t in expected[2]]
    (tmp_path / "arr.json").write_text(json.dumps([{"body": "x y"}, {"body": ""}, {"body": "z"}]))
    assert list(iter_documents(tmp_path / "arr.json", text_key="body")) == [(0, "x y"), (2, "z")]
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe end")
    assert list(iter_documents(tmp_path / "bad.txt")) == [(0, "ok \ufffd\ufffd end")]
    (tmp_path / "blank.md").write_text("  \n\n")
    assert list(iter_documents(tmp_path / "blank.md")) == []


def test_missing_text_key_names_file_line_and_key(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"content": "no text here"}\n')
    with pytest.raises(UserError, match=r"x\.jsonl, line 3: .*no 'text' field.*text_key=content"):
        list(iter_documents(bad))
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "p.parquet")
    with pytest.raises(UserError, match=r"p\.parquet: .*no column 'text'.*body.*text_key="):
        list(iter_documents(tmp_path / "p.parquet"))
    (tmp_path / "j.jsonl").write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(UserError, match=r"j\.jsonl, line 2: not valid JSON"):
        list(iter_documents(tmp_path / "j.jsonl"))


def test_missing_text_key_in_a_worker_is_a_user_error(tmp_path, tokenizer_path):
    """With a given tokenizer the file is first read in a litdata worker process; the error still comes back."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "ok.jsonl").write_text('{"text": "fine"}\n')
    (tmp_path / "in" / "x.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    out = tmp_path / "out"
    cfg = PrepareConfig(inputs=[str(tmp_path / "in")], output=str(out), tokenizer=str(tokenizer_path), num_workers=1)
    with pytest.raises(UserError, match=r"x\.jsonl, line 2: .*no 'text' field.*text_key=body"):
        prepare(cfg)
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_trained_tokenizer_sees_only_train_documents(corpus, tmp_path, monkeypatch):
    _, inputs, expected = corpus
    seen: list[str] = []

    def spy(texts, vocab_size, eos_token):
        texts = list(texts)
        seen.extend(texts)
        return train_bpe(texts, vocab_size, eos_token)

    monkeypatch.setattr(prep, "train_bpe", spy)
    out = prepare(
        PrepareConfig(inputs=inputs[:2], output=str(tmp_path / "o"), vocab_size=300, val_fraction=0.3, num_workers=1)
    )
    train = [t for source in _split_docs(expected[:2], 0.3, "train") for _, _, t in source]
    assert seen == train
    tok = load_tokenizer(out)
    assert tok.get_vocab_size() == 300 and tok.token_to_id("<|endoftext|>") == 0
    assert (
        isinstance(tok.pre_tokenizer, pre_tokenizers.ByteLevel) and tok.decode(tok.encode("über 🙂").ids) == "über 🙂"
    )
    m = read_manifest(out / "train")
    assert (
        m["tokenizer"]["eos_id"] == 0
        and m["tokenizer"]["sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    )
    assert _read_stream(out / "train").tolist() == _expected_stream(tok, train, 0)


def test_stdlib_discovery():
    root, paths = stdlib_files()
    assert 300 < len(paths) < 1500
    rel = [p.relative_to(root) for p in paths]
    assert all(p.suffix == ".py" for p in rel)
    assert not [p for p in rel if STDLIB_SKIP & set(p.parts[:-1])]
    assert Path("json/decoder.py") in rel and Path("os.py") in rel
    assert not [p for p in rel if p.parts[0] in ("test", "idlelib", "lib2to3", "site-packages")]
    (files,) = discover(["stdlib"])
    assert [f.key for f in files] == sorted(p.as_posix() for p in rel)
    assert 5e6 < sum(f.size for f in files) < 3e7


def test_prepare_a_stdlib_subset_splits_by_file(tmp_path):
    stdlib = sysconfig.get_paths()["stdlib"]
    out = prepare(
        PrepareConfig(
            inputs=[f"{stdlib}/json/*.py", f"{stdlib}/email/*.py"],
            output=str(tmp_path / "o"),
            vocab_size=512,
            val_fraction=0.3,
            num_workers=1,
        )
    )
    tok = load_tokenizer(out / "tokenizer.json")
    for split in ("train", "val"):
        m = read_manifest(out / split)
        docs = [
            p.read_text()
            for pattern in ("json", "email")
            for p in sorted(Path(stdlib, pattern).glob("*.py"))
            if p.read_text().strip() and is_held_out(p.name, 0, 0.3) == (split == "val")
        ]
        assert m["documents"] == len(docs) > 0
        assert _read_stream(out / split).tolist() == _expected_stream(tok, docs, 0)


def test_tokenizer_directory_and_eos_from_tokenizer_config(corpus, tokenizer_path, tmp_path):
    _, inputs, expected = corpus
    tok = load_tokenizer(tokenizer_path)
    tok.add_special_tokens(["</s>"])
    tdir = tmp_path / "tok"
    tdir.mkdir()
    tok.save(str(tdir / "tokenizer.json"))
    assert resolve_eos(tok, tdir) == ("<|endoftext|>", 0)  # no config: the first common name in the vocabulary
    (tdir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert resolve_eos(tok, tdir / "tokenizer.json") == ("</s>", 300)
    (tdir / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>", "special": True}}))
    assert resolve_eos(tok, tdir) == ("</s>", 300)
    assert resolve_eos(tok, tdir, eos_token="<|endoftext|>") == ("<|endoftext|>", 0)  # eos_token= wins

    out = prepare(PrepareConfig(inputs=inputs[2:3], output=str(tmp_path / "o"), tokenizer=str(tdir), num_workers=1))
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "train"]  # val_fraction=0: no val split
    m = read_manifest(out / "train")
    assert (m["tokenizer"]["eos_token"], m["tokenizer"]["eos_id"]) == ("</s>", 300)
    assert _read_stream(out / "train").tolist() == _expected_stream(tok, [t for _, _, t in expected[2]], 300)


def test_overwrite_replaces_and_output_is_deterministic(corpus, tokenizer_path, tmp_path):
    _, inputs, _ = corpus
    out = tmp_path / "o"
    cfg = PrepareConfig(inputs=inputs[1:2], output=str(out), tokenizer=str(tokenizer_path), num_workers=1)
    prepare(cfg)
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (out / "marker").write_text("old")
    with pytest.raises(UserError, match=r"already exists.*overwrite=true"):
        prepare(cfg)
    assert (out / "marker").exists()
    cfg.overwrite = True
    prepare(cfg)
    second = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert not (out / "marker").exists() and not list(tmp_path.glob("o.*-*"))
    assert first.keys() == second.keys()
    for name in first:
        if name.suffix == ".json" and name.name != "tokenizer.json":  # manifest.json, litdata's index.json
            a, b = json.loads(first[name]), json.loads(second[name])
            for d in (a, b):
                d.pop("created", None), d.pop("updated_at", None)
            assert a == b
        else:
            assert first[name] == second[name], name


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failure_midway_leaves_no_output_and_keeps_the_old_one(corpus, tokenizer_path, tmp_path, monkeypatch, exc):
    import litdata

    _, inputs, _ = corpus
    calls = []

    def broken_optimize(fn, inputs, output_dir, **kwargs):
        calls.append(output_dir)
        multiprocessing.set_start_method("spawn", force=True)  # what the real one does first
        Path(output_dir, "chunk-0-0.bin").write_bytes(b"half")
        raise exc("interrupted")

    monkeypatch.setattr(litdata, "optimize", broken_optimize)
    original = multiprocessing.get_start_method(allow_none=True)
    out = tmp_path / "o"
    cfg = PrepareConfig(inputs=inputs[2:3], output=str(out), tokenizer=str(tokenizer_path))
    with pytest.raises(exc):
        prepare(cfg)
    assert calls and not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    assert multiprocessing.get_start_method(allow_none=True) == original

    out.mkdir()
    (out / "marker").write_text("old")
    cfg.overwrite = True
    with pytest.raises(exc):
        prepare(cfg)
    assert (out / "marker").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_user_errors(corpus, tokenizer_path, tmp_path):
    root, inputs, _ = corpus

    def cfg(**kw):
        base = {"inputs": inputs[2:3], "output": str(tmp_path / "o"), "tokenizer": str(tokenizer_path)}
        return PrepareConfig(**{**base, **kw})

    with pytest.raises(UserError, match=r"'nope/x\.jsonl' does not exist"):
        prepare(cfg(inputs=["nope/x.jsonl"]))
    with pytest.raises(UserError, match=r"glob 'nope/\*\.txt' matches no files"):
        prepare(cfg(inputs=["nope/*.txt"]))
    with pytest.raises(UserError, match=r"No inputs"):
        prepare(cfg(inputs=[]))
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "a.csv").write_text("x")
    with pytest.raises(UserError, match=r"holds no files to read"):
        prepare(cfg(inputs=[str(tmp_path / "csv")]))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / "b.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(UserError, match=r"input '.*empty' yields no documents"):
        prepare(cfg(inputs=[inputs[2], str(tmp_path / "empty")], tokenizer=None))
    with pytest.raises(UserError, match=r"val_fraction=1.5"):
        prepare(cfg(val_fraction=1.5))
    with pytest.raises(UserError, match=r"x\.jsonl, line 1: .*no 'text' field.*text_key=body"):
        (tmp_path / "k").mkdir()
        (tmp_path / "k" / "x.jsonl").write_text('{"body": "t"}\n')
        prepare(cfg(inputs=[str(tmp_path / "k")], tokenizer=None))
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.tmp-*"))

    (tmp_path / "o").mkdir()
    with pytest.raises(UserError, match=r"already exists.*overwrite=true"):
        prepare(cfg())

    # tokenizers
    with pytest.raises(UserError, match=r"tokenizer .*missing\.json does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(UserError, match=r"holds no tokenizer\.json"):
        load_tokenizer(tmp_path / "csv")
    (tmp_path / "garbage.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(UserError, match=r"Could not load the tokenizer .*garbage\.json"):
        load_tokenizer(tmp_path / "garbage.json")
    with pytest.raises(UserError, match=r"Could not load the tokenizer"):
        prepare(cfg(output=str(tmp_path / "o2"), tokenizer=str(tmp_path / "garbage.json")))
    no_eos = train_bpe(["some text"], vocab_size=260, eos_token="<pad>")
    no_eos.save(str(tmp_path / "noeos.json"))
    with pytest.raises(UserError, match=r"end-of-document token.*eos_token="):
        prepare(cfg(output=str(tmp_path / "o2"), tokenizer=str(tmp_path / "noeos.json")))
    with pytest.raises(UserError, match=r"eos_token='<nope>' is not in the vocabulary"):
        resolve_eos(no_eos, tmp_path / "noeos.json", "<nope>")
    assert resolve_eos(no_eos, tmp_path / "noeos.json", "<pad>") == ("<pad>", 0)
    assert not (tmp_path / "o2").exists() and not list(tmp_path.glob("o2.tmp-*"))


def test_read_manifest_errors(prepared, tmp_path):
    with pytest.raises(UserError, match=r"no manifest\.json.*point at one of its splits"):
        read_manifest(prepared["out"])
    with pytest.raises(UserError, match=r"not a split prepared"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(UserError, match=r"Could not read"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(UserError, match=r"not a valid lit-open manifest"):
        read_manifest(tmp_path)


def test_token_dtype():
    def word_level(n):
        return Tokenizer(models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0"))

    assert [token_dtype(word_level(n)) for n in (300, 65536, 65537, 200_000)] == ["uint16", "uint16", "int32", "int32"]


def test_discover_sorts_and_skips_the_output(tmp_path):
    for name in ("b/z.txt", "a.jsonl", "b/a.py", "out/train/manifest.json", "__pycache__/x.py", "b/.git/c.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    (files,) = discover([str(tmp_path)], exclude=[tmp_path / "out"])
    assert [f.key for f in files] == ["a.jsonl", "b/a.py", "b/z.txt"]
    assert files[1].path == str(tmp_path / "b" / "a.py") and files[1].size == 1 and files[1].source == 0


def test_ctrl_c_while_tokenizing_exits_non_zero_and_leaves_nothing(tmp_path, tokenizer_path):
    """litdata's own SIGINT handler would os._exit(0) and leave `<output>.tmp-<pid>` behind."""
    out = tmp_path / "o"
    command = ["prepare", "inputs=[stdlib]", f"output={out}", f"tokenizer={tokenizer_path}", "num_workers=1"]
    proc = subprocess.Popen([sys.executable, "-m", "lit_open.cli", *command], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    # optimize creates its (private) scratch dir just before it installs its SIGINT handler and starts the worker
    while not (tmp_path / f"o.tmp-{proc.pid}" / "_work" / "litdata-chunks").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the worker takes ~2 s to start and tokenizing the stdlib seconds more: still inside optimize
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "nothing was written" in stderr and "Prepared" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_undecodable_bytes_are_counted_and_named_per_file(tokenizer_path, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text("plain UTF-8 text: café, naïve, 日本\n")
    (corpus / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9 au lait"}\n{"text": "na\xefve \xe0 la carte"}\n')  # 3
    (corpus / "broken.txt").write_bytes(b"ok \xff\xfe then a cut-off \xe2\x82")  # 2 + 2
    out = tmp_path / "out"
    result = cli_here("prepare", f"inputs=[{corpus}]", f"output={out}", f"tokenizer={tokenizer_path}", "num_workers=1")
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "not UTF-8" in line]
    assert len(notes) == 2, result.stderr
    assert f"{corpus / 'broken.txt'}: 4 bytes" in notes[0] and f"{corpus / 'latin1.jsonl'}: 3 bytes" in notes[1]
    for split in ("train",):
        (source,) = read_manifest(out / split)["sources"]
        assert source["undecodable_bytes"] == 7


def _mixed_text(size: int) -> str:
    """Code (indentation, blank lines, runs of spaces), prose, digits, a long line and non-ASCII text."""
    parts, n = [], 0
    for i, path in enumerate(stdlib_files()[1]):
        parts.append(path.read_text(errors="replace"))
        parts.append("\n\nPlain prose follows here.  Two spaces, then 1234567 digits; café → 日本 🙂.\n")
        if i % 20 == 0:  # a long line, a long run without spaces, and whitespace-only lines
            parts.append(" ".join(["word"] * 3000) + "\n" + "=" * 5000 + "\n\n\n   \n")
        n += sum(len(part) for part in parts[-3:])
        if n >= size:
            return "".join(parts)[:size]
    raise AssertionError("the standard library is too small")


class _SpyTokenizer:
    """A tokenizer that remembers the longest text it was asked to encode."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.longest = tokenizer, 0

    def __getattr__(self, name: str):
        attr = getattr(self.tokenizer, name)
        if not name.startswith("encode"):
            return attr

        def encode(texts, *args, **kwargs):
            self.longest = max(self.longest, *(len(t) for t in ([texts] if isinstance(texts, str) else texts)))
            return attr(texts, *args, **kwargs)

        return encode


def _llama3_style(texts: list[str]) -> Tokenizer:
    """A BPE with Llama 3's pre-tokenizer (a split regex, then bytes) and a BOS added by its post-processor."""
    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
        r"\s+(?!\S)|\s+"
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok


def _sentencepiece_style(texts: list[str]) -> Tokenizer:
    """Llama 2's layout: no pre-tokenizer, a normalizer that prepends "▁" to every text it is given."""
    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["</s>"]))
    return tok


@pytest.mark.parametrize("kind", ["project", "llama3_style", "sentencepiece_style"])
def test_long_documents_are_tokenized_in_pieces_with_the_same_tokens(kind, tmp_path, monkeypatch):
    text = _mixed_text(300_000)
    sample = [line for line in text[:100_000].splitlines() if line.strip()]
    build = {"project": lambda t: train_bpe(t, 1000), "llama3_style": _llama3_style}
    tok = build.get(kind, _sentencepiece_style)(sample)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "long.txt").write_text(text)
    add_special = kind == "llama3_style"
    job = prep._Job(
        files=(InputFile(str(tmp_path / "long.txt"), "long.txt", 0, len(text)),),
        split="train",
        val_fraction=0.0,
        text_key="text",
        tokenizer_path=str(tmp_path / "tokenizer.json"),
        eos_id=1,
        dtype="int32",
        add_special_tokens=add_special,
        stats_dir=str(tmp_path),
    )
    spy = _SpyTokenizer(Tokenizer.from_file(job.tokenizer_path))
    monkeypatch.setattr(prep, "_cached_tokenizer", lambda path: spy)
    monkeypatch.setattr(pieces, "PIECE_CHARS", 4096, raising=False)  # 73 pieces: a split point every 4k characters
    (tokens,) = list(prep._tokenize_item([0], job))
    assert tokens.tolist() == [*tok.encode(text, add_special_tokens=add_special).ids, 1]
    if kind == "sentencepiece_style":  # every piece would start with a "▁" the whole text has not: not split
        assert spy.longest == len(text)
    else:  # pieces of about 4096 characters (longer where no cut point is near: a run of 5000 "=")
        assert spy.longest < 10_000


MEMORY_PROBE = """
import json, re, sys
from pathlib import Path
from tokenizers import Tokenizer
from lit_open.data import prepare as prep
from lit_open.data.readers import InputFile

def peak_mb():  # this process's own peak RSS (getrusage's also counts the parent's, from before the exec)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024

work = Path(sys.argv[1])
job = prep._Job((InputFile(str(work / "long.txt"), "long.txt", 0, 0),), "train", 0.0, "text",
                str(work / "tokenizer.json"), 0, "uint16", False, str(work))
Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from the RSS now (Linux)
before = peak_mb()
(tokens,) = list(prep._tokenize_item([0], job))
growth = peak_mb() - before
text = (work / "long.txt").read_text()
whole = Tokenizer.from_file(job.tokenizer_path).encode(text, add_special_tokens=False).ids + [0]
result = {"growth_mb": growth, "whole_mb": peak_mb() - before, "tokens": len(whole)}
print(json.dumps({**result, "equal": tokens.tolist() == whole}))
"""


@pytest.mark.slow
def test_a_long_document_is_tokenized_in_bounded_memory(tmp_path):
    """A 4 MB document: its tokens as if tokenized whole, in a fraction of the memory that takes (about 600 MB)."""
    text = _mixed_text(4_000_000)
    (tmp_path / "long.txt").write_text(text)
    train_bpe([text[:1_000_000]], 512).save(str(tmp_path / "tokenizer.json"))
    probe = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    result = json.loads(probe.stdout.splitlines()[-1])
    assert result["equal"] and result["tokens"] > 1_500_000, result
    # tokenized whole it takes about 700 MB more (about 400 bytes a token), in pieces about 150 MB
    assert result["growth_mb"] < 250 and result["growth_mb"] < result["whole_mb"] / 3, result
