"""Released corpora read in place: files written byte by byte in each publisher's layout, and every refusal.

Layouts: Megatron MMIDIDX (NVIDIA/Megatron-LM@d98e8a6:megatron/core/datasets/indexed_dataset.py#L142-L214),
Dolma headerless token arrays (allenai/dolma@669f534:python/dolma/tokenizer/memmap_writer.py#L153-L189), LLM360
jsonl lines {"token_ids": [...], "source": ...} (LLM360/amber-data-prep README).
"""

from __future__ import annotations

import json
import os
import pickle
import struct

import numpy as np
import pytest

from lit_open.data.line_index import index_paths
from lit_open.data.released import numeric_key, open_released
from lit_open.errors import UserError

BLOCK = 9  # data.seq_len 8 + 1


def tokens(n: int, block: int = BLOCK, start: int = 0) -> np.ndarray:
    return (np.arange(n * block, dtype=np.int64).reshape(n, block) * 7 + start) % 50000


def write_mmidx(prefix, samples: np.ndarray, code: int = 8, np_dtype: str = "<u2", doc_idx=None, extra=b""):
    """An MMIDIDX pair as Megatron's builder writes it: header, int32 lengths, int64 byte pointers, int64 doc idx."""
    n = len(samples)
    lengths = np.array([len(s) for s in samples], dtype="<i4")
    itemsize = np.dtype(np_dtype).itemsize
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1].astype(np.int64) * itemsize)]).astype("<i8")
    doc_idx = np.arange(n + 1, dtype="<i8") if doc_idx is None else np.asarray(doc_idx, dtype="<i8")
    with open(f"{prefix}.idx", "wb") as fh:
        fh.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code))
        fh.write(struct.pack("<Q", n) + struct.pack("<Q", len(doc_idx)))
        fh.write(lengths.tobytes() + pointers.tobytes() + doc_idx.tobytes() + extra)
    with open(f"{prefix}.bin", "wb") as fh:
        for s in samples:
            fh.write(np.asarray(s).astype(np_dtype).tobytes())


def test_megatron_reads_samples_by_prefix_idx_or_bin(tmp_path):
    data = tokens(5)
    write_mmidx(tmp_path / "document", data)
    assert (tmp_path / "document.idx").stat().st_size == 34 + 12 * 5 + 8 * 6
    for path in (tmp_path / "document", tmp_path / "document.idx", tmp_path / "document.bin"):
        reader = open_released("megatron", path, BLOCK, "data.sources[0]", vocab_size=50000)
        assert reader.format == "megatron" and reader.samples == 5
        for i in range(5):
            out = reader.read(i)
            assert out.dtype == np.int64 and np.array_equal(out, data[i])
        assert reader.locate(3) == ("document.bin", 3)
    clone = pickle.loads(pickle.dumps(reader))
    assert np.array_equal(clone.read(4), data[4]) and len(pickle.dumps(reader)) < 2000


def test_megatron_int32_tokens(tmp_path):
    data = tokens(3) + 70000
    write_mmidx(tmp_path / "d", data, code=4, np_dtype="<i4")
    assert np.array_equal(open_released("megatron", tmp_path / "d", BLOCK, "k").read(2), data[2])


def test_megatron_shards_are_one_byte_space(tmp_path):
    """Pythia's shard_memmap.py cuts the .bin into equal byte chunks: items (even tokens) straddle shards."""
    data = tokens(7)
    write_mmidx(tmp_path / "document", data)
    raw = (tmp_path / "document.bin").read_bytes()
    (tmp_path / "document.bin").unlink()
    shard = 25  # odd: a uint16 token is split across two shards
    pieces = [raw[i : i + shard] for i in range(0, len(raw), shard)]
    of = len(raw) // shard  # "-of-" names the last index, as shard_memmap.py does
    for k, piece in enumerate(pieces):
        (tmp_path / f"document-{k:05d}-of-{of:05d}.bin").write_bytes(piece)
    reader = open_released("megatron", tmp_path / "document-00000-of-00005.bin", BLOCK, "k")
    assert [reader.read(i).tolist() for i in range(7)] == data.tolist()
    assert reader.locate(6) == (f"document-{(6 * BLOCK * 2) // shard:05d}-of-{of:05d}.bin", 6)
    (tmp_path / "document-00002-of-00005.bin").unlink()
    with pytest.raises(UserError, match=r"incomplete.*cat document-\*-of-\*.bin > document.bin"):
        open_released("megatron", tmp_path / "document", BLOCK, "k")


@pytest.mark.parametrize(
    "damage, match",
    [
        ("truncated_bin", r"document.bin holds 88 bytes.*truncated"),
        ("magic", r"not a Megatron mmap index.*MMIDIDX"),
        ("tntidx", r"legacy fairseq TNTIDX"),
        ("code6", r"dtype code 6; accepted are the integer codes 1-5 and 8.*float"),
        ("version", r"version 2; only version 1"),
        ("multimodal", r"multimodal layout"),
        ("truncated_idx", r"truncated, multimodal or not MMIDIDX"),
        ("length", r"sequence 1 has 10 tokens.*data.seq_len must be the sequence length - 1.*preshuffled Pile"),
        ("missing_bin", r"neither .*document.bin nor its shards"),
    ],
)
def test_megatron_refuses_bad_files(tmp_path, damage, match):
    prefix = tmp_path / "document"
    samples = list(tokens(5))
    if damage == "length":
        samples[1] = np.arange(BLOCK + 1)
    write_mmidx(
        prefix, samples, code=6 if damage == "code6" else 8, extra=b"\x00" * 5 if damage == "multimodal" else b""
    )
    idx, bin_ = tmp_path / "document.idx", tmp_path / "document.bin"
    raw = bytearray(idx.read_bytes())
    if damage == "truncated_bin":
        bin_.write_bytes(bin_.read_bytes()[:88])
    elif damage in ("magic", "tntidx"):
        raw[:9] = b"XXIDIDX\x00\x00" if damage == "magic" else b"TNTIDX\x00\x00\x00"
    elif damage == "version":
        raw[9:17] = struct.pack("<Q", 2)
    elif damage == "truncated_idx":
        raw = raw[:-3]
    elif damage == "missing_bin":
        bin_.unlink()
    idx.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=match) as err:
        open_released("megatron", prefix, BLOCK, "data.sources[1]")
    assert "data.sources[1]" in str(err.value)


def test_megatron_agrees_with_megatron_core(tmp_path):
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    torch = pytest.importorskip("torch")
    data = tokens(6)
    builder = indexed.IndexedDatasetBuilder(str(tmp_path / "core.bin"), dtype=np.uint16)
    for row in data:
        builder.add_item(torch.tensor(row))
        builder.end_document()
    builder.finalize(str(tmp_path / "core.idx"))
    write_mmidx(tmp_path / "ours", data)
    assert (tmp_path / "core.idx").read_bytes() == (tmp_path / "ours.idx").read_bytes()
    assert (tmp_path / "core.bin").read_bytes() == (tmp_path / "ours.bin").read_bytes()
    reference = indexed.IndexedDataset(str(tmp_path / "core"))  # kept alive: its arrays are views of its mmap
    reader = open_released("megatron", tmp_path / "core", BLOCK, "k")
    assert reader.samples == len(reference)
    for i in range(len(reference)):
        assert np.array_equal(reader.read(i), np.asarray(reference[i]).astype(np.int64))
    del reference


def write_tokens(path, values, dtype):
    np.asarray(values, dtype=dtype).tofile(path)  # headerless, as Dolma's memmap writer leaves it


def test_numpy_instances_files_in_list_order_with_duplicates(tmp_path):
    seq = BLOCK - 1
    a = np.arange(3 * seq + 5)  # 3 instances, 5 tokens dropped
    b = np.arange(2 * seq) + 1000
    write_tokens(tmp_path / "a.npy", a, np.uint32)
    write_tokens(tmp_path / "b.npy", b, np.uint32)
    write_tokens(tmp_path / "short.npy", np.arange(seq - 1), np.uint32)  # no instance at all
    (tmp_path / "list.txt").write_text("b.npy\n\na.npy\nshort.npy\nb.npy\n")
    reader = open_released("numpy", tmp_path / "list.txt", BLOCK, "k", dtype="uint32", vocab_size=2000)
    assert reader.format == "numpy" and reader.samples == 2 + 3 + 0 + 2
    first = reader.read(0)
    assert first.dtype == np.int64 and len(first) == BLOCK
    assert first[:-1].tolist() == b[:seq].tolist() and first[-1] == -100  # the last position has no target
    assert reader.read(4)[:-1].tolist() == a[2 * seq : 3 * seq].tolist()
    assert reader.read(6)[:-1].tolist() == b[seq:].tolist()
    assert [reader.locate(i) for i in (0, 2, 4, 5, 6)] == [
        ("b.npy", 0),
        ("a.npy", 0),
        ("a.npy", 2),
        ("b.npy", 0),
        ("b.npy", 1),
    ]
    directory = open_released("numpy", tmp_path, BLOCK, "k", dtype="uint32")
    assert directory.samples == 5 and directory.locate(3) == ("b.npy", 0)
    assert pickle.loads(pickle.dumps(reader)).read(4).tolist() == reader.read(4).tolist()


def test_numpy_refusals(tmp_path):
    write_tokens(tmp_path / "odd.npy", np.arange(17), np.uint16)  # 34 bytes: not a multiple of 4
    with pytest.raises(UserError, match=r"odd.npy is 34 bytes, not a multiple of 4 \(uint32\).*truncated"):
        open_released("numpy", tmp_path / "odd.npy", BLOCK, "k", dtype="uint32")
    with pytest.raises(UserError, match=r"k: the numpy format needs dtype \('uint16' or 'uint32'\)"):
        open_released("numpy", tmp_path / "odd.npy", BLOCK, "k")
    with pytest.raises(UserError, match=r"k.dtype='int8' is not supported"):
        open_released("numpy", tmp_path / "odd.npy", BLOCK, "k", dtype="int8")
    np.save(tmp_path / "header.npy", np.arange(64, dtype=np.uint16))
    with pytest.raises(UserError, match="with a header"):
        open_released("numpy", tmp_path / "header.npy", BLOCK, "k", dtype="uint16")
    (tmp_path / "urls.txt").write_text("http://olmo-data.org/x.npy\n")
    with pytest.raises(UserError, match="line 1 is a URL"):
        open_released("numpy", tmp_path / "urls.txt", BLOCK, "k", dtype="uint16")


def test_numpy_uint16_file_read_as_uint32_exceeds_the_vocab(tmp_path):
    write_tokens(tmp_path / "part-0.npy", np.arange(40) % 50 + 3, np.uint16)
    assert open_released("numpy", tmp_path, BLOCK, "k", dtype="uint16", vocab_size=50280).samples == 5
    with pytest.raises(UserError, match=r"part-0.npy sample 0 holds token id \d+, .* 50280 ids.*try dtype=uint16"):
        open_released("numpy", tmp_path, BLOCK, "k", dtype="uint32", vocab_size=50280)


def write_jsonl(path, rows, **extra):
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps({"token_ids": [int(t) for t in row], "source": "arxiv", **extra}) + "\n")


def test_llm360_numeric_file_order_read_locate_and_sidecar(tmp_path):
    data = tmp_path / "train"
    data.mkdir()
    write_jsonl(data / "train_10.jsonl", tokens(2, start=10))
    write_jsonl(data / "train_2.jsonl", tokens(3, start=2))
    (data / "notes.txt").write_text("not data")
    reader = open_released("llm360", data, BLOCK, "k", vocab_size=50000)
    assert reader.format == "llm360" and reader.samples == 5
    assert reader.names == ["train_2.jsonl", "train_10.jsonl"]
    assert reader.read(3).tolist() == tokens(2, start=10)[0].tolist() and reader.read(3).dtype == np.int64
    assert reader.locate(1) == ("train_2.jsonl", 1) and reader.locate(4) == ("train_10.jsonl", 1)
    assert sorted(p.name for p in data.iterdir()) == sorted(
        [".train_10.jsonl.lit-open-index.npy", ".train_2.jsonl.lit-open-index.npy", "notes.txt"]
        + ["train_10.jsonl", "train_2.jsonl"]
    )
    assert pickle.loads(pickle.dumps(reader)).read(4).tolist() == reader.read(4).tolist()
    assert sorted(["train_10", "train_002", "train_1"], key=numeric_key) == ["train_1", "train_002", "train_10"]


def test_llm360_stale_index_is_rebuilt(tmp_path):
    file = tmp_path / "chunk_0.jsonl"
    write_jsonl(file, tokens(2))
    assert open_released("llm360", file, BLOCK, "k").samples == 2
    write_jsonl(file, tokens(4, start=5))
    os.utime(file, ns=(1, 1))  # a new size and mtime
    reader = open_released("llm360", file, BLOCK, "k")
    assert reader.samples == 4 and reader.read(3).tolist() == tokens(4, start=5)[3].tolist()


def test_llm360_line_length_and_missing_token_ids(tmp_path):
    file = tmp_path / "chunk_0.jsonl"
    write_jsonl(file, tokens(2, block=2048))  # K2 lines
    with pytest.raises(UserError, match=r"chunk_0.jsonl line 1 has 2048 token_ids.*2049.*K2 lines are 2048"):
        open_released("llm360", file, 2049, "data.sources[0]")
    with open(file, "w") as fh:
        fh.write(json.dumps({"token_ids": list(range(BLOCK))}) + "\n" + json.dumps({"ids": [1]}) + "\n")
    reader = open_released("llm360", file, BLOCK, "k")
    with pytest.raises(UserError, match=r"chunk_0.jsonl line 2 is not a JSON object with token_ids"):
        reader.read(1)


def test_llm360_read_only_directory_puts_the_index_in_the_cache(tmp_path, monkeypatch):
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    write_jsonl(data / "train_000.jsonl", tokens(3))
    monkeypatch.setenv("LIT_OPEN_CACHE", str(cache))
    data.chmod(0o555)
    try:
        if os.access(data, os.W_OK):
            pytest.skip("running as root: chmod does not make the directory read-only")
        reader = open_released("llm360", data, BLOCK, "k")
        assert reader.read(2).tolist() == tokens(3)[2].tolist()
        assert sorted(p.name for p in data.iterdir()) == ["train_000.jsonl"]
        local, cached = index_paths(data / "train_000.jsonl")
        assert cached.is_file() and cached.is_relative_to(cache / "released-index") and not local.exists()
        assert open_released("llm360", data, BLOCK, "k").samples == 3  # found again in the cache
    finally:
        data.chmod(0o755)


def test_unknown_format_and_missing_path(tmp_path):
    with pytest.raises(UserError, match=r"k.format='parquet' is not supported; choose one of: megatron, numpy"):
        open_released("parquet", tmp_path, BLOCK, "k")
    with pytest.raises(UserError, match=r"k: .*nothing does not exist"):
        open_released("llm360", tmp_path / "nothing", BLOCK, "k")


def test_llm360_index_goes_to_the_cache_when_the_directory_is_not_writable(tmp_path, monkeypatch):
    """The same fallback as above, by os.access, so that it also runs as root."""
    import lit_open.data.released as released

    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    write_jsonl(data / "train_000.jsonl", tokens(3))
    monkeypatch.setenv("LIT_OPEN_CACHE", str(cache))
    monkeypatch.setattr(released.os, "access", lambda path, mode: False)
    assert open_released("llm360", data, BLOCK, "k").read(1).tolist() == tokens(3)[1].tolist()
    assert sorted(p.name for p in data.iterdir()) == ["train_000.jsonl"]
    cached = index_paths(data / "train_000.jsonl")[1]
    assert cached.is_file() and cached.is_relative_to(cache / "released-index")
    (data / "empty").mkdir()
    with pytest.raises(UserError, match=r"k: .*empty holds no sample of 9 tokens"):
        open_released("llm360", data / "empty", BLOCK, "k")
