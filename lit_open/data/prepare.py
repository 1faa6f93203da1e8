"""`lit-open prepare`: raw text -> tokenizer -> litdata token chunks + a manifest per split.

Output layout (built in `<output>.tmp-<pid>` and renamed to `<output>` only when complete)::

    <output>/tokenizer.json        the tokenizer used (copied byte for byte, or the one trained here)
    <output>/train/                litdata chunks (TokensLoader), one 1-D array per document, EOS after each
    <output>/train/manifest.json   counts per source, tokenizer hash, dtype, ... (see `read_manifest`)
    <output>/val/                  the same for the held-out documents, only when val_fraction > 0 ...
    <output>/val-<name>/           ... or one split per input with val_by_input (names: readers.input_names)
    <output>/tasks/next_line/      an lm-eval task made from held-out documents (see lit_open.data.next_line)

Tokenizing runs in litdata `optimize` workers (spawned processes). Each work item is a run of consecutive input
files (a dataset input's shards count as files: `lit_open.data.hf_datasets`); the worker function yields one array
per document and, when a run is done, writes that run's per-file document, token and text-byte counts to a side
directory, which the main process sums into the manifest. So the counts are exact without tokenizing twice, and the
tokens are checked against the token total of litdata's own index. Long documents are tokenized in pieces
(`lit_open.data.pieces`). Bytes that are not UTF-8 are counted per file, named on the console and counted per input
in the manifest.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from tokenizers import Tokenizer

from lit_open.config import PrepareConfig
from lit_open.data.manifest import MANIFEST, source_entries, split_manifest
from lit_open.data.next_line import TASK_NAME, write_next_line_task
from lit_open.data.pieces import encode_in_pieces
from lit_open.data.readers import InputFile, ReadStats, discover, input_names, is_held_out, read_input
from lit_open.data.tokenizer import (
    DEFAULT_EOS,
    TOKENIZER_FILE,
    load_tokenizer,
    resolve_eos,
    token_dtype,
    tokenizer_file,
    train_bpe,
)
from lit_open.data.val_splits import val_sources_override, val_splits
from lit_open.errors import UserError
from lit_open.glue import litdata_optimize_sandbox

_ENCODE_BATCH_DOCS = 1024  # documents handed to the Rust tokenizer at once (it encodes a batch in parallel)
_ENCODE_BATCH_CHARS = 1 << 20  # ... or characters: the tokenizer takes about 150 bytes per token while it encodes
_NOTED_FILES = 10  # files with bytes that are not UTF-8 named on the console
_ITEM_MAX_BYTES = 32 << 20  # a work item is a run of consecutive files of at most this many bytes (or one file)
_ITEMS_PER_WORKER = 4
# A worker process costs seconds to start (it imports torch), and the Rust tokenizer already encodes a batch on
# all cores, so a worker is added per this many bytes of text only (the 11 MB stdlib: one worker, 2x faster).
_BYTES_PER_WORKER = 64 << 20

console = Console(stderr=True, highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------------------- public API


def prepare(cfg: PrepareConfig) -> Path:
    """Tokenize `cfg.inputs` into litdata chunks under `cfg.output`; return the output directory.

    Raises UserError for every problem with the inputs or the config. An interrupted or failed run leaves no
    `<output>` behind (and an existing one untouched).
    """
    start = time.perf_counter()
    _check_config(cfg)
    output = Path(cfg.output).expanduser().absolute()
    if (output.exists() or output.is_symlink()) and not cfg.overwrite:
        raise UserError(
            f"The prepare output {output} already exists. Pass overwrite=true to replace it (the new data "
            "replaces it only once complete), or choose another output=."
        )
    if cfg.tokenizer is not None:  # check it before any work
        given = tokenizer_file(cfg.tokenizer)
        tokenizer = load_tokenizer(given)
        eos_token, eos_id = resolve_eos(tokenizer, given, cfg.eos_token)
    tmp = output.with_name(f"{output.name}.tmp-{os.getpid()}")
    _warn_stale_tmp(output, tmp)
    siblings = [*output.parent.glob(f"{output.name}.tmp-*"), *output.parent.glob(f"{output.name}.old-*")]
    # never read our own (old, partial) output
    sources = discover(cfg.inputs, exclude=[output, tmp, *siblings], text_key=cfg.text_key)
    files = [f for source in sources for f in source]
    on_disk = [f for f in files if f.dataset is None]
    found = [f"{len(on_disk)} files ({_mb(sum(f.size for f in on_disk))})"] if on_disk else []
    found += [f"{len(files) - len(on_disk)} dataset shards"] if len(on_disk) < len(files) else []
    console.print(f"Found {' and '.join(found)} in {len(sources)} input{'s' if len(sources) > 1 else ''}.")

    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        tokenizer_path = tmp / TOKENIZER_FILE
        if cfg.tokenizer is None:
            tokenizer = _train_on_inputs(cfg, sources, files)
            tokenizer.save(str(tokenizer_path))
            eos_token = cfg.eos_token or DEFAULT_EOS
            eos_id = tokenizer.token_to_id(eos_token)
        else:
            shutil.copyfile(given, tokenizer_path)
        vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        dtype = token_dtype(tokenizer)
        tokenizer_info = {
            "sha256": hashlib.sha256(tokenizer_path.read_bytes()).hexdigest(),
            "vocab_size": vocab_size,
            "eos_token": eos_token,
            "eos_id": eos_id,
        }
        job = _Job(
            files=tuple(files),
            split="train",
            val_fraction=cfg.val_fraction,
            text_key=cfg.text_key,
            tokenizer_path=str(tokenizer_path),
            eos_id=eos_id,
            dtype=dtype,
            add_special_tokens=cfg.add_special_tokens,
            stats_dir=str(tmp / "_work" / "stats"),
        )
        # train: every file (each worker also counts the held-out documents it skips); val: only files that have any
        sizes = {i: f.size for i, f in enumerate(files)}
        stats = {"train": _write_split(job, sizes, tmp, cfg)}
        train_docs, held_out = [0] * len(sources), [0] * len(sources)
        for i, s in stats["train"].items():
            train_docs[files[i].source] += s.documents
            held_out[files[i].source] += s.other
        _check_documents(cfg, sources, train_docs, held_out)
        undecodable = _note_undecodable(files, stats["train"], len(sources))  # the train pass reads every file
        names = input_names(cfg.inputs)
        inputs_of = {"train": list(range(len(sources)))}  # the inputs each split's manifest lists
        if cfg.val_fraction > 0:
            held = {i: s for i, s in stats["train"].items() if s.other}  # the files holding held-out documents
            splits = val_splits(names, cfg.val_by_input, (files[i].source for i in held))
            for s in sorted(set(range(len(sources))) - {s for which in splits.values() for s in which}):
                console.print(f"  [yellow]Note:[/] no document of the input {escape(cfg.inputs[s])} is held out.")
            inputs_of.update(splits)
            for split, which in splits.items():
                # the split's files, weighted by the share of their documents held out
                sizes = {
                    i: f.size * held[i].other // (held[i].other + held[i].documents)
                    for i, f in enumerate(files)
                    if i in held and f.source in which
                }
                stats[split] = _write_split(replace(job, split=split), sizes, tmp, cfg)
            _write_heldout_task(cfg, [files[i] for i in held], tmp / "tasks" / TASK_NAME)

        settings = {
            "val_fraction": cfg.val_fraction,
            "val_by_input": cfg.val_by_input,
            "text_key": cfg.text_key,
            "add_special_tokens": cfg.add_special_tokens,
            "chunk_tokens": cfg.chunk_tokens,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        for split, per_file in stats.items():
            entries = source_entries(cfg.inputs, names, sources, per_file, undecodable, inputs_of[split])
            manifest = split_manifest(split, entries, dtype, tokenizer_info, settings)
            (tmp / split / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(tmp / "_work")
        _publish(tmp, output, cfg.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    parts = []
    for split, per_file in stats.items():
        docs, tokens = sum(s.documents for s in per_file.values()), sum(s.tokens for s in per_file.values())
        parts.append(f"{split} {docs:,} documents / {tokens:,} tokens")
    console.print(f"Prepared {output}: {', '.join(parts)} ({dtype}) in {time.perf_counter() - start:.1f} s.")
    if cfg.val_by_input:
        console.print(f"Score each input's held-out split by name: {val_sources_override(output, stats)}")
    return output


def _note_undecodable(files: list[InputFile], per_file: dict[int, _FileStats], num_sources: int) -> list[int]:
    """Name the files that hold bytes that are not UTF-8 (and how many) on the console; return the count per input."""
    bad = [(files[i], s.undecodable) for i, s in sorted(per_file.items()) if s.undecodable]
    for f, n in bad[:_NOTED_FILES]:
        console.print(f"  [yellow]Note:[/] {escape(f.path)}: {n:,} byte{'s' * (n > 1)} not UTF-8, replaced by U+FFFD")
    if len(bad) > _NOTED_FILES:
        console.print(
            f"  [yellow]Note:[/] and {len(bad) - _NOTED_FILES:,} more files with bytes that are not UTF-8 "
            f"({sum(n for _, n in bad):,} bytes in all; manifest.json counts them per input)"
        )
    return [sum(n for f, n in bad if f.source == source) for source in range(num_sources)]


def _write_heldout_task(cfg: PrepareConfig, files: list[InputFile], out_dir: Path) -> None:
    """The next-line benchmark from (up to 400 of) the held-out documents, for in-loop evaluation."""

    def held_out() -> Iterator[tuple[str, str]]:
        for f in files:
            for index, text in read_input(f, cfg.text_key):
                if is_held_out(f.key, index, cfg.val_fraction):
                    yield f"{f.key}:{index}", text

    items = write_next_line_task(itertools.islice(held_out(), 400), out_dir, seed=0)
    if items:
        console.print(f"  wrote an lm-eval task of {items} items from held-out documents: tasks/{TASK_NAME}/")


@dataclass
class _FileStats:
    documents: int = 0  # documents of this split
    tokens: int = 0  # their tokens, EOS included
    other: int = 0  # documents of the other split (skipped)
    undecodable: int = 0  # bytes of the file that are not UTF-8 (replaced by U+FFFD)
    bytes: int = 0  # UTF-8 bytes of the text of this split's documents (before any special tokens)


@dataclass(frozen=True)
class _Job:
    """What a tokenizing worker needs (pickled into each spawned litdata worker)."""

    files: tuple[InputFile, ...]  # every input file (and dataset shard)
    split: str  # train, or a held-out split: val, val-<name>
    val_fraction: float
    text_key: str
    tokenizer_path: str
    eos_id: int
    dtype: str
    add_special_tokens: bool
    stats_dir: str


def _check_config(cfg: PrepareConfig) -> None:
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise UserError(
            f"val_fraction={cfg.val_fraction} must be at least 0 and below 1 (the share of documents held out for "
            "validation, e.g. 0.01); 0 writes no val split."
        )
    if cfg.tokenizer is None and cfg.vocab_size < 257:
        raise UserError(
            f"vocab_size={cfg.vocab_size} is too small for a byte-level BPE: it needs the 256 byte tokens and the "
            "end-of-document token, so at least 257 (e.g. 4096, 32000)."
        )
    if cfg.chunk_tokens < 1:
        raise UserError(f"chunk_tokens={cfg.chunk_tokens} must be a positive number of tokens per chunk file.")
    if cfg.num_workers < 0:
        raise UserError(f"num_workers={cfg.num_workers} must be 0 or more (0 and 1 both mean one worker process).")
    if not cfg.text_key:
        raise UserError("text_key= must name the field (jsonl) or column (parquet) that holds the text.")
    if isinstance(cfg.inputs, str):
        raise UserError(f"inputs={cfg.inputs!r} must be a list, e.g. inputs='[{cfg.inputs}]'.")
    if cfg.val_by_input and cfg.val_fraction <= 0:
        raise UserError("val_by_input=true writes a held-out split per input: it needs val_fraction above 0 too.")


def _train_on_inputs(cfg: PrepareConfig, sources: list[list[InputFile]], files: list[InputFile]) -> Tokenizer:
    eos_token = cfg.eos_token or DEFAULT_EOS
    counts = [[0, 0] for _ in sources]  # per source: train documents, held-out documents
    seen = {"documents": 0, "chars": 0}

    def train_texts() -> Iterator[str]:
        for f in files:
            for index, text in read_input(f, cfg.text_key):
                if is_held_out(f.key, index, cfg.val_fraction):
                    counts[f.source][1] += 1
                    continue
                counts[f.source][0] += 1
                seen["documents"] += 1
                seen["chars"] += len(text)
                yield text

    train_bytes = sum(f.size for f in files)
    console.print(
        f"Training a {cfg.vocab_size}-token byte-level BPE on the train split of {len(files)} files "
        f"({_mb(train_bytes)}{f', less the {cfg.val_fraction:g} held out' if cfg.val_fraction else ''})..."
    )
    t0 = time.perf_counter()
    tokenizer = train_bpe(train_texts(), cfg.vocab_size, eos_token)
    _check_documents(cfg, sources, [c[0] for c in counts], [c[1] for c in counts])
    console.print(
        f"  trained on {seen['documents']:,} documents ({seen['chars'] / 1e6:.1f} M characters) in "
        f"{time.perf_counter() - t0:.1f} s; vocabulary {tokenizer.get_vocab_size():,}."
    )
    return tokenizer


def _check_documents(
    cfg: PrepareConfig, sources: list[list[InputFile]], train_documents: list[int], held_out: list[int]
) -> None:
    """UserError for an input without documents, or a split that would be empty (counts are per input)."""
    for s, spec in enumerate(cfg.inputs):
        if train_documents[s] + held_out[s] == 0:
            raise UserError(
                f"The input '{spec}' yields no documents: its {len(sources[s])} file(s) or shard(s) hold only empty "
                f"text. Remove it from inputs=, or check that text_key={cfg.text_key!r} names the field that holds "
                "the text."
            )
    if sum(train_documents) == 0:
        raise UserError(
            f"val_fraction={cfg.val_fraction} held out every one of the {sum(held_out)} documents, leaving none to "
            "train on. Lower val_fraction= or add inputs."
        )
    if cfg.val_fraction > 0 and sum(held_out) == 0:
        raise UserError(
            f"val_fraction={cfg.val_fraction} held out none of the {sum(train_documents)} documents (the split is by "
            "a hash of file and document index). Raise val_fraction=, add inputs, or set val_fraction=0."
        )


def _write_split(job: _Job, sizes: dict[int, int], tmp: Path, cfg: PrepareConfig) -> dict[int, _FileStats]:
    """Tokenize the `job.split` documents of the files `sizes` names (file index: bytes of text to tokenize, about)
    into `tmp/<split>`; return the per-file counts."""
    from litdata import TokensLoader, optimize  # slow to import: only tokenizing needs it

    file_indices = sorted(sizes)
    total = sum(sizes.values())
    num_workers = max(1, min(cfg.num_workers, -(-total // _BYTES_PER_WORKER)))
    items = _work_items(file_indices, sizes, num_workers)
    num_workers = min(num_workers, len(items))
    out_dir = tmp / job.split
    out_dir.mkdir()
    stats_dir = Path(job.stats_dir)
    shutil.rmtree(stats_dir, ignore_errors=True)
    stats_dir.mkdir(parents=True)
    console.print(
        f"Tokenizing the {job.split} split ({len(file_indices)} files, {num_workers} worker process"
        f"{'es' if num_workers > 1 else ''})..."
    )
    t0 = time.perf_counter()
    with litdata_optimize_sandbox(tmp / "_work"):
        try:
            optimize(
                fn=functools.partial(_tokenize_item, job=job),
                inputs=items,
                output_dir=str(out_dir),
                chunk_size=cfg.chunk_tokens,
                item_loader=TokensLoader(),
                num_workers=num_workers,
                mode="overwrite",
                reorder_files=False,
                # One worker reads its items in order either way, and the unordered mode skips a process per
                # worker that litdata starts otherwise; with several workers, ordered mode keeps the output (the
                # order of documents and chunks) identical from run to run.
                keep_data_ordered=num_workers > 1,
                verbose=False,
            )
        except Exception:
            errors = sorted(stats_dir.glob("error-*.txt"))
            if errors:
                raise UserError(errors[0].read_text()) from None
            raise
    stats = _read_stats(stats_dir, file_indices)
    tokens = sum(s.tokens for s in stats.values())
    documents = sum(s.documents for s in stats.values())
    written = _index_tokens(out_dir)
    if written != tokens:
        raise RuntimeError(f"lit-open bug: litdata wrote {written} tokens to {out_dir}, the workers counted {tokens}.")
    console.print(f"  {job.split}: {documents:,} documents, {tokens:,} tokens in {time.perf_counter() - t0:.1f} s.")
    return stats


def _work_items(file_indices: list[int], sizes: dict[int, int], num_workers: int) -> list[list[int]]:
    """Runs of consecutive files of similar total size, a few per worker (litdata gives each worker a slice)."""
    target = min(_ITEM_MAX_BYTES, max(1, sum(sizes.values()) // (num_workers * _ITEMS_PER_WORKER)))
    items: list[list[int]] = []
    size = 0
    for i in file_indices:
        if items and size + sizes[i] <= target:
            items[-1].append(i)
            size += sizes[i]
        else:
            items.append([i])
            size = sizes[i]
    return items


def _tokenize_item(item: list[int], job: _Job) -> Iterator[np.ndarray]:
    """litdata worker fn: yield one token array (EOS appended) per `job.split` document of the item's files."""
    try:
        tokenizer = _cached_tokenizer(job.tokenizer_path)
        encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        dtype = np.dtype(job.dtype)
        stats = {i: _FileStats() for i in item}
        want_val = job.split != "train"
        batch: list[tuple[int, str]] = []
        chars = 0

        def flush() -> Iterator[np.ndarray]:
            nonlocal chars
            encodings = encode([text for _, text in batch], add_special_tokens=job.add_special_tokens) if batch else []
            for (i, _), encoding in zip(batch, encodings):
                ids = encoding.ids
                ids.append(job.eos_id)
                stats[i].documents += 1
                stats[i].tokens += len(ids)
                yield np.asarray(ids, dtype=dtype)
            batch.clear()
            chars = 0

        for i in item:
            f = job.files[i]
            read = ReadStats()
            for index, text in read_input(f, job.text_key, read):
                if is_held_out(f.key, index, job.val_fraction) != want_val:
                    stats[i].other += 1
                    continue
                stats[i].bytes += len(text.encode("utf-8"))
                ids = encode_in_pieces(tokenizer, text, job.add_special_tokens, dtype, _ENCODE_BATCH_CHARS)
                if ids is not None:  # a long document
                    yield from flush()  # the documents before it first: the order stays the files'
                    stats[i].documents += 1
                    stats[i].tokens += len(ids) + 1
                    yield np.append(ids, np.asarray(job.eos_id, dtype=dtype))
                    continue
                batch.append((i, text))
                chars += len(text)
                if len(batch) >= _ENCODE_BATCH_DOCS or chars >= _ENCODE_BATCH_CHARS:
                    yield from flush()
            stats[i].undecodable = read.undecodable_bytes
        yield from flush()
        record = {str(i): [s.documents, s.tokens, s.other, s.undecodable, s.bytes] for i, s in stats.items()}
        _write_atomic(Path(job.stats_dir) / f"item-{item[0]}.json", json.dumps(record))
    except UserError as err:
        _write_atomic(Path(job.stats_dir) / f"error-{item[0]:09d}.txt", str(err))
        raise


@functools.lru_cache(maxsize=2)
def _cached_tokenizer(path: str) -> Tokenizer:
    return Tokenizer.from_file(path)


def _write_atomic(path: Path, text: str) -> None:
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    os.replace(part, path)


def _read_stats(stats_dir: Path, file_indices: list[int]) -> dict[int, _FileStats]:
    stats: dict[int, _FileStats] = {}
    for path in stats_dir.glob("item-*.json"):
        for i, counts in json.loads(path.read_text()).items():
            stats[int(i)] = _FileStats(*counts)
    missing = set(file_indices) - set(stats)
    if missing:
        raise RuntimeError(f"lit-open bug: no token counts came back for {len(missing)} input file(s).")
    return stats


def _index_tokens(split_dir: Path) -> int:
    index = json.loads((split_dir / "index.json").read_text())
    return sum(chunk["dim"] for chunk in index["chunks"])


def _publish(tmp: Path, output: Path, overwrite: bool) -> None:
    """Move the finished `tmp` to `output`; an existing output is replaced only now (and only with overwrite)."""
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise UserError(f"The prepare output {output} appeared while preparing; pass overwrite=true to replace it.")
        old = output.with_name(f"{output.name}.old-{os.getpid()}")
        os.rename(output, old)
        os.rename(tmp, output)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        os.rename(tmp, output)


def _warn_stale_tmp(output: Path, own: Path) -> None:
    if not output.parent.is_dir():
        return
    stale = [p for p in output.parent.glob(f"{output.name}.tmp-*") if p != own]
    if stale:
        console.print(
            f"[yellow]Note:[/] {', '.join(str(p) for p in stale)} left by an interrupted prepare; delete "
            f"{'it' if len(stale) == 1 else 'them'} if no other prepare is running."
        )


def _mb(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.1f} MB"
