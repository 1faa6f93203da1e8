"""The synthetic corpora of `bench data`: one seeded random token stream written in every source format (litdata
chunks as `lit-open prepare` writes them, megatron .idx/.bin, a headerless numpy array, llm360 jsonl), and the same
files `--scale` times larger (hard links under new names), reused from `--dir` when they match."""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
from litdata import TokensLoader, optimize

from lit_open.data.line_index import index_paths, line_offsets
from lit_open.data.manifest import FORMAT, MANIFEST
from lit_open.data.released import numeric_key
from lit_open.errors import UserError
from lit_open.glue import litdata_optimize_sandbox

LAYOUT_VERSION = 1  # of the corpora this module writes (a --dir holding another layout is rewritten)
_DOCUMENT_TOKENS = (16, 8192)  # litdata: document lengths drawn in this range, as prepare writes one array each
_ITEM_TOKENS = 1 << 20  # litdata: tokens per optimize work item
_LINES_PER_FILE = 4096  # llm360: lines per jsonl file (train_0.jsonl, train_1.jsonl, ...)


def write_corpora(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The stream and every format's files under `root` (at scale 1 and `args.scale`); reused when they match."""

    block = args.seq_len + 1
    stamp = {
        "layout": LAYOUT_VERSION,
        "tokens": args.tokens,
        "seq_len": args.seq_len,
        "vocab_size": args.vocab_size,
        "seed": args.seed,
        "chunk_tokens": args.chunk_tokens,
        "scale": args.scale,
        "formats": sorted(args.formats),
    }
    stamp_file = root / "corpus.json"
    found = json.loads(stamp_file.read_text()) if stamp_file.is_file() else {}
    same = {**found.get("stamp", {}), "formats": stamp["formats"]} == stamp
    if same and set(args.formats) <= set(found["stamp"]["formats"]):  # this corpus, with (at least) these formats
        corpus = found["corpus"]
    else:
        if stamp_file.is_file():  # another corpus of this module's: what it wrote goes
            for child in root.iterdir():
                if child.name in ("corpus.json", "stream.u16") or re.fullmatch(r"x\d+", child.name):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        elif root.exists() and any(root.iterdir()):
            raise UserError(f"--dir {root} holds files, but no corpus of this benchmark: give an empty directory.")
        root.mkdir(parents=True, exist_ok=True)
        corpus = _write(root, args, block)
        stamp_file.write_text(json.dumps({"stamp": stamp, "corpus": corpus}, indent=1) + "\n")
    _warm_page_cache(root)
    return corpus


def _write(root: Path, args: argparse.Namespace, block: int) -> dict[str, Any]:
    samples = args.tokens // block
    stream = root / "stream.u16"
    rng = np.random.default_rng(args.seed)
    with open(stream, "wb") as fh:
        for start in range(0, samples * block, 1 << 24):
            size = min(1 << 24, samples * block - start)
            rng.integers(0, args.vocab_size, size, dtype=np.uint16).tofile(fh)
    corpus: dict[str, Any] = {"stream": str(stream), "stream_tokens": samples * block, "formats": {}}
    writers = {"litdata": _write_litdata, "megatron": _write_megatron, "numpy": _write_numpy, "llm360": _write_llm360}
    scalers = {"litdata": _scale_litdata, "megatron": _scale_megatron, "numpy": _scale_numpy, "llm360": _scale_llm360}
    for fmt in args.formats:
        base = root / "x1" / fmt
        base.mkdir(parents=True)
        info = writers[fmt](base, stream, samples, block, args)
        info["scaled_path"] = info["path"]
        if args.scale > 1:
            big = root / f"x{args.scale}" / fmt
            big.mkdir(parents=True)
            info["scaled_path"] = str(scalers[fmt](Path(info["path"]), big, args.scale))
        corpus["formats"][fmt] = info
    return corpus


def _litdata_documents(item: tuple[int, int], stream: str, seed: int):
    """optimize fn: the documents (1-D uint16 arrays of random lengths) of stream tokens [start, end), in order."""
    start, end = item
    tokens = np.memmap(stream, dtype=np.uint16, mode="r")
    rng = np.random.default_rng([seed, start])
    while start < end:
        length = min(int(rng.integers(*_DOCUMENT_TOKENS)), end - start)
        yield np.array(tokens[start : start + length])
        start += length


def _write_litdata(base: Path, stream: Path, samples: int, block: int, args: argparse.Namespace) -> dict:

    total = samples * block
    bounds = list(range(0, total, _ITEM_TOKENS)) + [total]
    items = list(zip(bounds[:-1], bounds[1:]))
    with litdata_optimize_sandbox(base.parent / "_litdata-work"):
        optimize(  # as lit_open.data.prepare._write_split: one worker, items in order
            fn=functools.partial(_litdata_documents, stream=str(stream), seed=args.seed),
            inputs=items,
            output_dir=str(base),
            chunk_size=args.chunk_tokens,
            item_loader=TokensLoader(),
            num_workers=1,
            mode="overwrite",
            reorder_files=False,
            keep_data_ordered=False,
            verbose=False,
        )
    shutil.rmtree(base.parent / "_litdata-work", ignore_errors=True)
    chunks = json.loads((base / "index.json").read_text())["chunks"]
    dims = [c["dim"] for c in chunks]
    if sum(dims) != total:
        raise RuntimeError(f"litdata wrote {sum(dims)} tokens to {base}, the stream has {total}.")
    manifest = {
        "format": FORMAT,
        "split": "train",
        "documents": sum(c["chunk_size"] for c in chunks),
        "tokens": total,
        "dtype": "uint16",
        "tokenizer": {"sha256": "synthetic", "eos_id": 0},
    }
    (base / MANIFEST).write_text(json.dumps(manifest) + "\n")
    # where each chunk starts in the stream: the truth of sample (chunk, j) without reading the chunk files
    return {"path": str(base), "chunk_dims": dims}


def _write_megatron(base: Path, stream: Path, samples: int, block: int, args: argparse.Namespace) -> dict:
    _write_mmidx(base / "corpus.idx", samples, block, 1)
    os.link(stream, base / "corpus.bin")  # the stream is the samples back to back: the .bin's bytes
    return {"path": str(base / "corpus")}


def _write_mmidx(idx: Path, samples: int, block: int, shards: int) -> None:
    n = samples * shards
    with open(idx, "wb") as fh:
        fh.write(struct.pack("<9sQBQQ", b"MMIDIDX\x00\x00", 1, 8, n, n + 1))  # code 8: uint16
        np.full(n, block, dtype="<i4").tofile(fh)
        (np.arange(n, dtype="<i8") * (2 * block)).tofile(fh)
        np.arange(n + 1, dtype="<i8").tofile(fh)


def _write_numpy(base: Path, stream: Path, samples: int, block: int, args: argparse.Namespace) -> dict:
    shutil.copyfile(stream, base / "corpus.npy")  # headerless uint16 tokens, as Dolma writes them
    return {"path": str(base / "corpus.npy")}


def _write_llm360(base: Path, stream: Path, samples: int, block: int, args: argparse.Namespace) -> dict:

    tokens = np.memmap(stream, dtype=np.uint16, mode="r")
    for number, first in enumerate(range(0, samples, _LINES_PER_FILE)):
        rows = np.asarray(tokens[first * block : min(samples, first + _LINES_PER_FILE) * block]).reshape(-1, block)
        path = base / f"train_{number}.jsonl"
        with open(path, "w") as fh:
            fh.writelines('{"token_ids": [' + ", ".join(map(str, row.tolist())) + "]}\n" for row in rows)
        line_offsets(path)  # the offset-index sidecar, as the first open builds it
    return {"path": str(base)}


def _link_as(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system (or none that links): a copy reads the same
        shutil.copyfile(source, target)


def _scale_litdata(path: Path, big: Path, scale: int) -> Path:
    index = json.loads((path / "index.json").read_text())
    chunks = []
    for k in range(scale):
        for chunk in index["chunks"]:
            name = f"x{k}-{chunk['filename']}"
            _link_as(path / chunk["filename"], big / name)
            chunks.append({**chunk, "filename": name})
    (big / "index.json").write_text(json.dumps({**index, "chunks": chunks}))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["tokens"] *= scale
    manifest["documents"] *= scale
    (big / "manifest.json").write_text(json.dumps(manifest) + "\n")
    return big


def _scale_megatron(prefix: Path, big: Path, scale: int) -> Path:
    """Pythia-style equal byte shards, each a link to the whole .bin: one byte space of `scale` copies."""
    bin_file = prefix.with_suffix(".bin")
    block = int(np.memmap(prefix.with_suffix(".idx"), dtype="<i4", mode="r", offset=34, shape=(1,))[0])
    samples = bin_file.stat().st_size // (2 * block)
    _write_mmidx(big / "corpus.idx", samples, block, scale)
    for k in range(scale):
        _link_as(bin_file, big / f"corpus-{k:05d}-of-{scale - 1:05d}.bin")
    return big / "corpus"


def _scale_numpy(file: Path, big: Path, scale: int) -> Path:
    for k in range(scale):
        _link_as(file, big / f"part-{k:05d}.npy")
    return big


def _scale_llm360(path: Path, big: Path, scale: int) -> Path:

    files = sorted(path.glob("*.jsonl"), key=lambda p: numeric_key(p.name))
    number = 0
    for _ in range(scale):
        for f in files:
            target = big / f"train_{number}.jsonl"
            _link_as(f, target)
            os.utime(target, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns))
            shutil.copyfile(index_paths(f)[0], index_paths(target)[0])  # same size and mtime: the index holds
            number += 1
    return big


def _warm_page_cache(root: Path) -> None:
    seen = set()
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        stat = path.stat()
        if (stat.st_dev, stat.st_ino) in seen:
            continue
        seen.add((stat.st_dev, stat.st_ino))
        with open(path, "rb", buffering=0) as fh:
            while fh.read(16 << 20):
                pass
