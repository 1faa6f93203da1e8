"""Data loading: samples/s and tokens/s per DataLoader worker of every source format, the litdata reference, memory.

One synthetic token stream (random ids, `--tokens` of them, seeded) is written in each source format: litdata
(chunks written by litdata `optimize` with a TokensLoader, as `lit-open prepare` writes them, plus a manifest),
megatron (.idx/.bin of uint16 samples of seq_len + 1 tokens), numpy (a headerless uint16 token array, OLMo's
instances of seq_len tokens) and llm360 (jsonl lines of token_ids, with their offset-index sidecars). The files are
read once before anything is timed (page cache warm).

Each format is read through the code path of training: `open_sources`, `TokenSamples` and its `collate` in the
DataLoader that `DataModule._loader` builds, fed micro-batches of keys in random order (as `StepBatchSampler`
yields them), once in-process (workers=0) and once with `--workers` worker processes. A rate counts seq_len tokens
per sample (the tokens a model trains on) and is given per worker (workers=0: the main process). For litdata the
same chunks are also read by a plain litdata loader (StreamingDataset + TokensLoader in a StreamingDataLoader,
same batch size and workers): `vs_reference` is lit-open's rate over that one, from the same run.

Every batch read before the timing (and the last timed one) is checked against the stream the files were written
from: the tokens of every sample (blake2b of the int64 tokens read vs expected), the batch keys and positions.

Memory: the peak resident memory of the main process and its workers together (sampled every 20 ms), over the same
number of micro-batches, for the corpus and for one `--scale` times larger (hard links to the same data files
under new names, with indexes that count `--scale` times the samples: every read hits real file pages). A reader
whose memory grows with the corpus shows up as rss growth between the two; mapped file pages count in RSS, the
PSS splits pages shared by the main process and its forked workers between them (RSS counts them in each), and
pss_anon leaves the file pages out.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from litdata import StreamingDataLoader, StreamingDataset, TokensLoader
from rich.console import Console
from rich.table import Table

from lit_open.bench.corpora import write_corpora
from lit_open.config import DataConfig, SourceConfig
from lit_open.data.datamodule import DataModule, TokenSamples, open_sources
from lit_open.errors import UserError
from lit_open.train.loss import IGNORE_INDEX

FORMATS = ("litdata", "megatron", "numpy", "llm360")
TARGET_TOKENS_PER_S = 3_000_000  # per worker, for every format


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=50_000_000, help="tokens of the synthetic corpus")
    parser.add_argument("--seq-len", type=int, default=2048, help="data.seq_len (samples of seq_len + 1 tokens)")
    parser.add_argument("--vocab-size", type=int, default=50_000, help="token ids are drawn below this (uint16)")
    parser.add_argument("--micro-batch", type=int, default=4, help="samples per micro-batch (data.micro_batch_size)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (also measured: 0, in-process)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement")
    parser.add_argument("--warmup-batches", type=int, default=20, help="untimed (and checked) micro-batches first")
    parser.add_argument("--scale", type=int, default=10, help="the larger corpus of the memory check: this many x")
    parser.add_argument("--rss-batches", type=int, default=300, help="micro-batches read per memory measurement")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--chunk-tokens", type=int, default=4_194_304, help="litdata: tokens per chunk (prepare's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write the corpora (kept, and reused when they match)"
    )


def run(args: argparse.Namespace) -> dict:

    block = args.seq_len + 1
    if args.tokens < 2 * block * max(1, args.micro_batch):
        raise UserError(f"--tokens={args.tokens} is too few for micro-batches of {args.micro_batch} x {block} tokens.")
    if args.vocab_size > 65536:
        raise UserError("--vocab-size must be at most 65536: the corpora hold uint16 tokens.")
    if args.workers < 0 or args.scale < 1 or args.micro_batch < 1:
        raise UserError("--workers must be >= 0, --scale and --micro-batch >= 1.")
    config = {
        "tokens": args.tokens,
        "seq_len": args.seq_len,
        "vocab_size": args.vocab_size,
        "micro_batch": args.micro_batch,
        "workers": args.workers,
        "seconds": args.seconds,
        "warmup_batches": args.warmup_batches,
        "scale": args.scale,
        "rss_batches": args.rss_batches,
        "formats": list(args.formats),
        "chunk_tokens": args.chunk_tokens,
        "seed": args.seed,
        "device": "cpu",
    }
    temp = None
    if args.dir is None:
        temp = tempfile.TemporaryDirectory(prefix="lit-open-bench-data-")
        root = Path(temp.name)
    else:
        root = args.dir.expanduser()
    try:
        started = time.perf_counter()
        corpus = write_corpora(root, args)
        config["write_seconds"] = round(time.perf_counter() - started, 2)
        results = {fmt: measure_format(fmt, corpus, args) for fmt in args.formats}
    finally:
        if temp is not None:
            temp.cleanup()
    summary = {
        "target_tokens_per_s_per_worker": TARGET_TOKENS_PER_S,
        "all_meet_target": all(r["meets_target"] for r in results.values()),
        "all_verified": all(r["verified"] and r.get("scaled_verified", True) for r in results.values()),
    }
    _print_table(config, results)
    return {"config": config, "results": {"formats": results, **summary}}


# -- the corpora ------------------------------------------------------------------------------------------------------


class Truth:
    """The tokens a sample must hold, from the stream the files were written from (never from the files read)."""

    def __init__(self, fmt: str, corpus: dict[str, Any], block: int) -> None:

        self.fmt, self.block, self.ignore = fmt, block, IGNORE_INDEX
        self.stream = np.memmap(corpus["stream"], dtype=np.uint16, mode="r")
        if fmt == "litdata":
            dims = np.asarray(corpus["formats"]["litdata"]["chunk_dims"], dtype=np.int64)
            self.chunk_start = np.concatenate([[0], np.cumsum(dims)[:-1]])  # stream offset of each chunk
            self.first = np.concatenate([[0], np.cumsum(dims // block)])  # first sample of each chunk
            self.samples = int(self.first[-1])
        elif fmt == "numpy":
            self.samples = len(self.stream) // (block - 1)
        else:
            self.samples = len(self.stream) // block

    def sample(self, index: int) -> np.ndarray:
        index %= self.samples  # the larger corpus repeats the smaller one
        if self.fmt == "numpy":
            seq = self.block - 1
            return np.append(self.stream[index * seq : (index + 1) * seq].astype(np.int64), self.ignore)
        if self.fmt == "litdata":
            c = int(np.searchsorted(self.first, index, side="right")) - 1
            start = int(self.chunk_start[c]) + (index - int(self.first[c])) * self.block
        else:
            start = index * self.block
        return self.stream[start : start + self.block].astype(np.int64)


# -- reading ----------------------------------------------------------------------------------------------------------


class RandomMicroBatches:
    """Micro-batches of (source 0, sample, data step, micro, n_micro) keys, samples in a seeded random order, as
    `StepBatchSampler` yields them (one global batch = `n_micro` micro-batches), forever."""

    def __init__(self, samples: int, micro_batch: int, seed: int, n_micro: int = 8) -> None:
        self.samples, self.micro_batch, self.seed, self.n_micro = samples, micro_batch, seed, n_micro

    def __iter__(self):
        k, epoch = 0, 0
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.samples)
            for start in range(0, self.samples - self.micro_batch + 1, self.micro_batch):
                step, micro = divmod(k, self.n_micro)
                yield [(0, int(i), step, micro, self.n_micro) for i in order[start : start + self.micro_batch]]
                k += 1
            epoch += 1


def open_source(fmt: str, path: str, block: int):

    config = SourceConfig(path=path, format=fmt, dtype="uint16" if fmt == "numpy" else None)
    return open_sources([config], block, f"bench.{fmt}")[0]


def lit_open_loader(source, block: int, micro_batch: int, workers: int, seed: int):
    """The DataLoader of training (DataModule._loader: TokenSamples, its collate, the worker settings)."""

    module = DataModule(DataConfig(seq_len=block - 1, micro_batch_size=micro_batch, num_workers=workers), seed=seed)
    return module._loader([source], RandomMicroBatches(source.samples, micro_batch, seed), workers=workers)


def reference_loader(path: str, block: int, micro_batch: int, workers: int, seed: int):
    """A plain litdata loader over the same chunks: StreamingDataset + TokensLoader in a StreamingDataLoader."""

    dataset = StreamingDataset(path, item_loader=TokensLoader(block_size=block), shuffle=True, seed=seed)
    return StreamingDataLoader(dataset, batch_size=micro_batch, num_workers=workers)


class _Batches:
    """Batches from `loader`, forever (a finite loader starts its next epoch)."""

    def __init__(self, loader) -> None:
        self.loader, self.iterator = loader, iter(loader)

    def next(self):
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.loader)
            return next(self.iterator)

    def close(self) -> None:
        del self.iterator  # stops the workers


class Checker:
    """Compares batches with the truth: tokens (a running blake2b of what was read and of what was expected), the
    sample keys and the batch positions."""

    def __init__(self, truth: Truth, micro_batch: int, seed: int, samples: int) -> None:
        self.truth = truth
        self.keys = iter(RandomMicroBatches(samples, micro_batch, seed))  # the sampler's micro-batches, again
        self.next_position = 0
        self.read, self.expected = hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16)
        self.samples = 0
        self.errors: list[str] = []

    def check(self, batch: dict, position: int) -> None:
        """`batch` is the loader's `position`-th micro-batch (0-based; positions only go up)."""
        while self.next_position <= position:
            keys, self.next_position = next(self.keys), self.next_position + 1
        want = [[s, i] for s, i, *_ in keys]
        if batch["samples"].tolist() != want:
            self.errors.append(f"micro-batch {position}: samples {batch['samples'].tolist()} != keys {want}")
        if (batch["data_step"], batch["micro"], batch["n_micro"]) != tuple(keys[0][2:]):
            found = (batch["data_step"], batch["micro"], batch["n_micro"])
            self.errors.append(f"micro-batch {position}: (data_step, micro, n_micro) {found} != {tuple(keys[0][2:])}")
        for row, (_, index, *_) in zip(tokens_of(batch), keys):
            expected = self.truth.sample(index)
            self.read.update(np.ascontiguousarray(row, dtype=np.int64).tobytes())
            self.expected.update(expected.tobytes())
            if not np.array_equal(row, expected):
                self.errors.append(f"sample {index}: its tokens differ from the corpus's")
            self.samples += 1

    def report(self) -> dict[str, Any]:
        return {
            "verified_samples": self.samples,
            "checksum_read": self.read.hexdigest(),
            "checksum_expected": self.expected.hexdigest(),
            "verified": not self.errors and self.samples > 0 and self.read.digest() == self.expected.digest(),
            "errors": self.errors[:5],
        }


def tokens_of(batch: dict) -> np.ndarray:
    """The samples' block_size tokens back from input_ids and targets."""
    inputs, targets = batch["input_ids"].numpy(), batch["targets"].numpy()
    if not np.array_equal(inputs[:, 1:], targets[:, :-1]):
        raise AssertionError("targets are not input_ids shifted by one")
    return np.concatenate([inputs, targets[:, -1:]], axis=1)


def timed(loader, workers: int, seq_len: int, args: argparse.Namespace, check=None) -> dict[str, float]:
    """Micro-batches for `args.seconds` after `args.warmup_batches` untimed ones (checked by `check`)."""
    batches = _Batches(loader)
    try:
        position = 0
        for _ in range(args.warmup_batches):
            batch = batches.next()
            if check is not None:
                check(batch, position)
            position += 1
        count, samples = 0, 0
        start = time.perf_counter()
        while True:
            batch = batches.next()
            count += 1
            samples += len(batch["input_ids"] if isinstance(batch, dict) else batch)
            elapsed = time.perf_counter() - start
            if elapsed >= args.seconds and count >= 3:
                break
        if check is not None:
            check(batch, position + count - 1)
    finally:
        batches.close()
    samples_per_s = samples / elapsed
    tokens_per_s = samples_per_s * seq_len
    return {
        "batches": count,
        "samples": samples,
        "seconds": round(elapsed, 3),
        "samples_per_s": samples_per_s,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_worker": tokens_per_s / max(1, workers),
    }


class PeakMemory:
    """Peaks, over a background sampling every `interval` s, of the memory of this process and all its children
    together (Linux /proc): rss (what each process has resident, shared pages counted in each), pss (shared pages
    split between the processes that map them: no double counting) and pss_anon (pss without file pages)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = {"rss": 0, "pss": 0, "pss_anon": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PeakMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        for key, value in tree_memory(os.getpid()).items():
            self.peak[key] = max(self.peak[key], value)


def tree_memory(pid: int) -> dict[str, int]:
    """Bytes of rss, pss and pss_anon summed over process `pid` and its descendants (/proc/PID/smaps_rollup; pss
    reads as rss where the kernel has no smaps_rollup)."""
    total = {"rss": 0, "pss": 0, "pss_anon": 0}
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
            try:
                lines = Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()[1:]  # after the [rollup] line
                fields = dict(line.split(":", 1) for line in lines)
                kib = {k: int(v.split()[0]) * 1024 for k, v in fields.items()}
                found = {"rss": kib["Rss"], "pss": kib["Pss"], "pss_anon": kib.get("Pss_Anon", kib["Pss"])}
            except (OSError, KeyError):
                rss = int(Path(f"/proc/{p}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                found = {"rss": rss, "pss": rss, "pss_anon": rss}
        except (OSError, ValueError):  # a process that just exited
            continue
        for key, value in found.items():
            total[key] += value
    return total


def peak_memory(loader, batches: int) -> dict[str, float]:
    reader = _Batches(loader)
    try:
        with PeakMemory() as memory:
            for _ in range(batches):
                reader.next()
    finally:
        reader.close()
    return {f"peak_{key}_mib": value / 2**20 for key, value in memory.peak.items()}


def verify_samples(source, truth: Truth, block: int, seed: int, count: int = 64) -> bool:
    """`count` samples spread over `source` (the first and last among them), read in-process, are the truth's."""

    samples = TokenSamples([source], block)
    picks = np.random.default_rng(seed).integers(0, source.samples, count).tolist() + [0, source.samples - 1]
    return all(np.array_equal(samples[(0, i, 0, 0, 1)]["tokens"].numpy(), truth.sample(i)) for i in picks)


def measure_format(fmt: str, corpus: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:

    block, seq_len, workers = args.seq_len + 1, args.seq_len, args.workers
    info = corpus["formats"][fmt]
    truth = Truth(fmt, corpus, block)
    source = open_source(fmt, info["path"], block)
    if source.samples != truth.samples:
        raise RuntimeError(f"{fmt}: open_sources counts {source.samples} samples, the corpus has {truth.samples}.")
    result: dict[str, Any] = {"path": info["path"], "samples": source.samples, "tokens": source.samples * seq_len}
    result["reader"] = type(source.open(block)).__name__  # what TokenSamples reads this format with
    checker = Checker(truth, args.micro_batch, args.seed, source.samples)
    rates = {}
    for w in sorted({0, workers}):
        check = checker.check if w == workers else None  # one checker follows one run's batches in order
        rates[w] = timed(lit_open_loader(source, block, args.micro_batch, w, args.seed), w, seq_len, args, check)
    result["in_process"] = rates[0]
    result["with_workers"] = rates[workers]
    if fmt == "litdata":
        reference = {
            w: timed(reference_loader(info["path"], block, args.micro_batch, w, args.seed), w, seq_len, args)
            for w in sorted({0, workers})
        }
        result["reference"] = {"in_process": reference[0], "with_workers": reference[workers]}
        result["vs_reference"] = {
            "in_process": rates[0]["tokens_per_s"] / reference[0]["tokens_per_s"],
            "with_workers": rates[workers]["tokens_per_s"] / reference[workers]["tokens_per_s"],
        }
    result.update(checker.report())
    rss = {}
    for scale, path in ((1, info["path"]), (args.scale, info["scaled_path"])):
        gc.collect()
        scaled = source if scale == 1 else open_source(fmt, path, block)
        if scaled.samples != scale * source.samples:
            raise RuntimeError(f"{fmt}: the x{scale} corpus has {scaled.samples} samples, not {scale} x.")
        loader = lit_open_loader(scaled, block, args.micro_batch, workers, args.seed + 1)
        rss[f"x{scale}"] = {"samples": scaled.samples, **peak_memory(loader, args.rss_batches)}
        if scale > 1:  # its samples are the smaller corpus's, read from other files
            result["scaled_verified"] = verify_samples(scaled, truth, block, args.seed)
    small, large = rss["x1"], rss[f"x{args.scale}"]
    for key in ("rss", "pss", "pss_anon"):
        rss[f"{key}_growth"] = large[f"peak_{key}_mib"] / small[f"peak_{key}_mib"]
    result["memory"] = rss
    per_worker = min(rates[0]["tokens_per_s_per_worker"], rates[workers]["tokens_per_s_per_worker"])
    result["meets_target"] = per_worker >= TARGET_TOKENS_PER_S
    return result


def _print_table(config: dict, results: dict) -> None:

    workers = config["workers"]
    table = Table(
        title=f"Data loading: {config['tokens']:,} tokens, seq_len {config['seq_len']}, micro-batch "
        f"{config['micro_batch']}, {workers} worker(s); M tokens/s per worker (target >= "
        f"{TARGET_TOKENS_PER_S / 1e6:g})",
        caption=f"memory: peak RSS of the main process + workers over {config['rss_batches']} micro-batches, "
        f"corpus x1 -> x{config['scale']} (PSS: shared pages split between processes)",
    )
    columns = ("format", "in-process", f"{workers} worker(s)", "vs litdata", "RSS MiB", "PSS MiB", "ok")
    for column in columns:
        table.add_column(column, justify="left" if column == "format" else "right")
    for fmt, r in results.items():
        vs = r.get("vs_reference")
        memory = r["memory"]
        big = f"x{config['scale']}"
        table.add_row(
            fmt,
            f"{r['in_process']['tokens_per_s_per_worker'] / 1e6:.2f}",
            f"{r['with_workers']['tokens_per_s_per_worker'] / 1e6:.2f}",
            f"{vs['in_process']:.2f}x / {vs['with_workers']:.2f}x" if vs else "",
            f"{memory['x1']['peak_rss_mib']:.0f} -> {memory[big]['peak_rss_mib']:.0f}",
            f"{memory['x1']['peak_pss_mib']:.0f} -> {memory[big]['peak_pss_mib']:.0f}",
            ("target" if r["meets_target"] else "BELOW") + ("" if r["verified"] else " UNVERIFIED"),
        )
    Console().print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    print(json.dumps(run(parser.parse_args()), indent=2, default=str))
