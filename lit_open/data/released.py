"""Readers of released tokenized corpora, read in place: Megatron .idx/.bin, OLMo/Dolma token arrays, LLM360 jsonl.

Why: replaying a published run (Pythia, OLMo 2, Amber) needs its samples exactly as the publisher trained on
them, and those corpora are hundreds of GB to TB. They are never copied, converted or re-tokenized: the files are
memory-mapped (or read line by line at a stored byte offset), and each sample is read when it is asked for.

Every reader gives the same view, `SampleReader`: `samples` fixed-length samples of `block_size` =
data.seq_len + 1 tokens (a lit-open sample carries its shifted target), `read(i)` (int64 tokens) and `locate(i)`
(file, index in that file) for the data-sequence log. Anything wrong with the files is a UserError that names
the file, the value found and what is accepted.

- "megatron": MMIDIDX (Megatron-LM, GPT-NeoX; Pythia's preshuffled Pile). A sample is one stored sequence; all
  must be block_size long (Pythia: 2049). Header (34 bytes, little-endian): magic, version, dtype code, N, D; then
  int32 lengths[N], int64 byte pointers[N], int64 document indices[D] (NVIDIA/Megatron-LM@d98e8a6:megatron/core/
  datasets/indexed_dataset.py#L142-L214). Codes 6 and 7 mean float32/float64 in one fork and the reverse in the
  other, and are no token type, so only 1-5 and 8 are read. Pythia's `PREFIX-NNNNN-of-MMMMM.bin` shards are raw
  byte splits (an item may straddle two) and are read as one concatenated byte space.
- "numpy": Dolma's headerless token arrays (named .npy, but np.load cannot read them), read as OLMo does: each
  file gives floor(tokens / seq_len) instances, the remainder is dropped, files in the listed order with
  duplicates kept (allenai/OLMo@59a53e3:olmo/data/memmap_dataset.py#L145-L196). An instance has seq_len tokens,
  so one IGNORE_INDEX is appended: its last position has no target, as in OLMo training.
- "llm360": jsonl with one `{"token_ids": [...]}` sample per line (Amber: 2049 ids; K2: 2048); the files of a
  directory in numeric-aware name order (train_2 before train_10, as the trainers' chunk loops). A byte-offset index
  per file is built once (a scan with a progress bar) and kept in a sidecar file next to it, or in the cache when
  the data directory is not writable; it is rebuilt when the file's size or mtime changes.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np

from lit_open.data.line_index import line_offsets
from lit_open.errors import UserError, check_choice
from lit_open.train.loss import IGNORE_INDEX

FORMATS = ("megatron", "numpy", "llm360")
_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count N, document-index count D
_TOKEN_CODES = {1: "<u1", 2: "<i1", 3: "<i2", 4: "<i4", 5: "<i8", 8: "<u2"}
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<of>\d{5})\.bin$")
_CHECK_CHUNK = 1 << 24  # lengths checked this many at a time (64 MiB of int32)
_NPY_MAGIC = b"\x93NUMPY"


class SampleReader:
    """Fixed-length samples of a released corpus, read in place."""

    format: str
    samples: int
    block_size: int
    files: list[Path]  # the data files, in sample order (a file may appear twice)
    names: list[str]  # each file's name relative to the source path, for locate()

    def read(self, index: int) -> np.ndarray:
        """Sample `index`: an int64 array of exactly block_size tokens."""
        raise NotImplementedError

    def locate(self, index: int) -> tuple[str, int]:
        """(file name relative to the source path, sample index within that file), for the data-sequence log."""
        f, local = self._find(index)
        return self.names[f], local

    def chunk_files(self) -> list[tuple[str, int]]:
        """(file name, samples) per file, in sample order: the chunks of data.order=llm360."""
        return list(zip(self.names, np.diff(self.starts).tolist()))

    def dtype_hint(self) -> str:
        """What to check when ids exceed the vocabulary (see `check_vocab`)."""
        return "check that the model's tokenizer is the one the corpus was tokenized with"

    # A reader goes to DataLoader workers by pickling: its maps and file handles stay behind and are reopened
    # (a pickled np.memmap would carry its whole contents).
    _handles: tuple[str, ...] = ()

    def _open(self) -> None:
        """(Re)open what `_handles` names."""

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self._handles}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    # files of `counts[f]` samples each, concatenated in order
    def _set_counts(self, counts: list[int], key: str, path: Path) -> None:
        self.starts = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])
        self.samples = int(self.starts[-1])
        if self.samples == 0:
            raise UserError(
                f"{key}: {path} holds no sample of {self.block_size} tokens (data.seq_len + 1); "
                "check the path, the format and data.seq_len."
            )

    def _check(self, index: int) -> None:
        if not 0 <= index < self.samples:
            raise IndexError(f"sample {index} out of range [0, {self.samples})")

    def _find(self, index: int) -> tuple[int, int]:
        self._check(index)
        f = int(np.searchsorted(self.starts, index, side="right")) - 1  # skips files without samples
        return f, index - int(self.starts[f])


def open_released(
    fmt: str, path: Path, block_size: int, key: str, dtype: str | None = None, vocab_size: int | None = None
) -> SampleReader:
    """Open a released corpus of format `fmt` at `path`; `key` (e.g. "data.sources[0]") is named in errors."""
    check_choice(f"{key}.format", fmt, FORMATS)
    path = Path(path).expanduser()
    if not path.exists() and not (fmt == "megatron" and Path(f"{path}.idx").exists()):
        hint = (
            ""
            if path.is_absolute()
            else " (a relative path: from the working directory, or under data.root=DIR, where the released-data "
            "presets such as data=amber take their files)"
        )
        raise UserError(f"{key}: {path} does not exist (format {fmt!r}){hint}.")
    if fmt == "megatron":
        reader: SampleReader = MegatronReader(path, block_size, key)
    elif fmt == "numpy":
        reader = NumpyReader(path, block_size, key, dtype)
    else:
        reader = JsonlReader(path, block_size, key)
    reader.read(0)  # fail at open, not at step one, when the samples are not what the config says
    if vocab_size is not None:
        check_vocab(reader, vocab_size, key)
    return reader


def check_vocab(reader: SampleReader, vocab_size: int, key: str) -> None:
    """Refuse ids >= vocab_size in the first, middle and last samples: a uint16 file read as uint32 (or the
    wrong tokenizer's corpus) looks like this."""
    for index in sorted({0, reader.samples // 2, reader.samples - 1}):
        ids = reader.read(index)
        if ids.max() >= vocab_size:
            name, local = reader.locate(index)
            raise UserError(
                f"{key}: {name} sample {local} holds token id {int(ids.max())}, but the vocabulary has "
                f"{vocab_size} ids (model.vocab_size); {reader.dtype_hint()}."
            )


class _ByteSpace:
    """Files read as one concatenated run of bytes: one file, or Pythia's equal-sized .bin shards."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.sizes = [f.stat().st_size for f in files]
        self.shard_size = self.sizes[0]
        self.total = sum(self.sizes)
        self._maps: list = [None] * len(files)  # each shard's open file, once read

    def shard_of(self, offset: int) -> int:
        return min(offset // self.shard_size, len(self.files) - 1) if self.shard_size else 0

    def read(self, offset: int, nbytes: int) -> np.ndarray:
        """Bytes [offset, offset + nbytes) as a (read-only) uint8 copy, across shard boundaries.

        Read with pread: a mapped .bin would keep each page read resident in the process, which a long run's random
        reads over a corpus of hundreds of GB turn into gigabytes of RSS."""
        parts = []
        while nbytes > 0:
            k = self.shard_of(offset)
            pos = offset - k * self.shard_size
            take = min(nbytes, self.sizes[k] - pos)
            if self._maps[k] is None:
                self._maps[k] = open(self.files[k], "rb", buffering=0)
            parts.append(os.pread(self._maps[k].fileno(), take, pos))
            offset, nbytes = offset + take, nbytes - take
        return np.frombuffer(parts[0] if len(parts) == 1 else b"".join(parts), dtype=np.uint8)


class MegatronReader(SampleReader):
    """Megatron MMIDIDX `.idx` + `.bin` (or `.bin` shards) of fixed-length samples."""

    format = "megatron"

    def __init__(self, path: Path, block_size: int, key: str) -> None:
        self.block_size, self.key = block_size, key
        self.idx = self._idx_path(path)
        idx_size = self.idx.stat().st_size
        with open(self.idx, "rb") as fh:
            head = fh.read(_HEADER.size)
        if len(head) < _HEADER.size or head[:9] != _MAGIC:
            what = "the legacy fairseq TNTIDX format" if head[:6] == b"TNTIDX" else f"magic {head[:9]!r}"
            raise UserError(
                f"{key}: {self.idx} is not a Megatron mmap index: found {what}, expected {_MAGIC!r} "
                "(MMIDIDX, written by Megatron-LM / GPT-NeoX preprocess_data.py with data-impl mmap)."
            )
        _, version, code, n, d = _HEADER.unpack(head)
        if version != 1:
            raise UserError(f"{key}: {self.idx} has MMIDIDX version {version}; only version 1 is read.")
        if code not in _TOKEN_CODES:
            why = ": 6 and 7 are float32/float64 (swapped between Megatron forks), not tokens" if code in (6, 7) else ""
            raise UserError(f"{key}: {self.idx} has dtype code {code}; accepted are the integer codes 1-5 and 8{why}.")
        expected = _HEADER.size + 12 * n + 8 * d
        if idx_size != expected:
            why = " (the multimodal layout, with one mode byte per sequence)" if idx_size == expected + n else ""
            raise UserError(
                f"{key}: {self.idx} is {idx_size} bytes{why}; a text index of {n} sequences and {d} document "
                f"indices is 34 + 12*{n} + 8*{d} = {expected} bytes. The file is truncated, multimodal or not MMIDIDX."
            )
        if n == 0:
            raise UserError(f"{key}: {self.idx} holds no sequence (format megatron).")
        self.dtype, self.samples = np.dtype(_TOKEN_CODES[code]), n
        self.files = self._bin_files()
        self._open()
        self._check_lengths()
        self.names = [f.name for f in self.files]
        end = int(self.pointers[-1]) + int(self.lengths[-1]) * self.dtype.itemsize
        if self.bin.total < end:
            raise UserError(
                f"{key}: {', '.join(self.names)} holds {self.bin.total} bytes, but {self.idx.name} puts its last "
                f"sequence at bytes [{int(self.pointers[-1])}, {end}): the .bin is truncated (or belongs to "
                "another .idx); download it again."
            )

    _handles = ("lengths", "pointers", "bin")

    def _open(self) -> None:
        n = self.samples
        self.lengths = np.memmap(self.idx, dtype="<i4", mode="r", offset=_HEADER.size, shape=(n,))
        self.pointers = np.memmap(self.idx, dtype="<i8", mode="r", offset=_HEADER.size + 4 * n, shape=(n,))
        self.bin = _ByteSpace(self.files)

    def _idx_path(self, path: Path) -> Path:
        shard = _SHARD.match(path.name)
        if shard:
            prefix = path.with_name(shard["stem"])
        else:
            prefix = path.with_suffix("") if path.suffix in (".idx", ".bin") else path
        idx = Path(f"{prefix}.idx")
        if not idx.is_file():
            raise UserError(f"{self.key}: {idx} does not exist; the megatron format needs PREFIX.idx and PREFIX.bin.")
        return idx

    def _check_lengths(self) -> None:
        n = len(self.lengths)
        for start in range(0, n, _CHECK_CHUNK):
            bad = np.flatnonzero(self.lengths[start : start + _CHECK_CHUNK] != self.block_size)
            if bad.size:
                i = start + int(bad[0])
                length = int(self.lengths[i])
                raise UserError(
                    f"{self.key}: {self.idx} sequence {i} has {length} tokens, but samples must have block_size = "
                    f"data.seq_len + 1 = {self.block_size}: data.seq_len must be the sequence length - 1 "
                    f"(data.seq_len={length - 1} if all are {length} long). Only fixed-length sample files (such as "
                    "Pythia's preshuffled Pile, 2049-token items) are read; a document-level .bin (one document "
                    "per sequence, e.g. pythia_deduped_pile_idxmaps) is not."
                )

    def _bin_files(self) -> list[Path]:
        prefix = self.idx.with_suffix("")
        single = Path(f"{prefix}.bin")
        if single.is_file():
            return [single]
        shards: dict[int, Path] = {}
        totals = set()
        for f in prefix.parent.glob(f"{prefix.name}-*-of-*.bin"):
            m = _SHARD.match(f.name)
            if m and m["stem"] == prefix.name:
                shards[int(m["index"])] = f
                totals.add(int(m["of"]))
        if not shards:
            raise UserError(f"{self.key}: neither {single} nor its shards {prefix.name}-NNNNN-of-MMMMM.bin exist.")
        of = max(totals)
        files = [shards[k] for k in sorted(shards)]
        sizes = [f.stat().st_size for f in files]
        # Pythia's shard_memmap.py names size // 5e9 + 1 files "-of-{size // 5e9}": indices 0..of
        if len(totals) != 1 or sorted(shards) != list(range(len(shards))) or len(shards) not in (of, of + 1):
            raise UserError(
                f"{self.key}: the shards of {single.name} are incomplete or mixed: found indices "
                f"{sorted(shards)} of {sorted(totals)}; expected {prefix.name}-00000-of-{of:05d}.bin up to "
                f"-{of:05d}-of-{of:05d}.bin. Download the missing ones, or concatenate them in order "
                f"(cat {prefix.name}-*-of-*.bin > {single.name})."
            )
        if any(s != sizes[0] for s in sizes[:-1]) or sizes[0] == 0:
            raise UserError(
                f"{self.key}: the shards of {single.name} are not equal byte splits (sizes {sizes}): every shard "
                f"but the last must be as large as the first. Concatenate them in order "
                f"(cat {prefix.name}-*-of-*.bin > {single.name}) if they were split otherwise."
            )
        return files

    def read(self, index: int) -> np.ndarray:
        self._check(index)
        pointer, nbytes = int(self.pointers[index]), self.block_size * self.dtype.itemsize
        if pointer < 0 or pointer + nbytes > self.bin.total:
            raise UserError(
                f"{self.key}: {self.idx} points sequence {index} at bytes [{pointer}, {pointer + nbytes}), "
                f"outside the {self.bin.total}-byte .bin; the .idx and .bin do not belong together."
            )
        return np.frombuffer(self.bin.read(pointer, nbytes), dtype=self.dtype).astype(np.int64)

    def chunk_files(self) -> list[tuple[str, int]]:
        return [(self.idx.name, self.samples)]  # one .idx: one chunk, however many .bin shards hold its bytes

    def locate(self, index: int) -> tuple[str, int]:
        """(the .bin file holding the sample's first byte, the sequence number in the .idx)."""
        self._check(index)
        return self.names[self.bin.shard_of(int(self.pointers[index]))], index

    def dtype_hint(self) -> str:
        return f"{self.idx.name} declares {self.dtype.name} tokens: check the tokenizer and the .idx/.bin pair"


class NumpyReader(SampleReader):
    """OLMo / Dolma headerless token arrays: instances of block_size - 1 tokens, then one IGNORE_INDEX."""

    format = "numpy"

    def __init__(self, path: Path, block_size: int, key: str, dtype: str | None) -> None:
        if dtype is None:
            raise UserError(
                f"{key}: the numpy format needs dtype ('uint16' or 'uint32'): the files have no header. OLMo 1 "
                "(GPT-NeoX tokenizer) files are uint16, OLMo 2 (dolma2 tokenizer) files uint32."
            )
        check_choice(f"{key}.dtype", dtype, ("uint16", "uint32"))
        self.block_size, self.key, self.dtype = block_size, key, np.dtype(dtype).newbyteorder("<")
        self.seq_len = block_size - 1
        self.files, self.names = self._list(path)
        counts = []
        for f in self.files:
            size = f.stat().st_size
            if size % self.dtype.itemsize:
                raise UserError(
                    f"{key}: {f} is {size} bytes, not a multiple of {self.dtype.itemsize} ({dtype}): the file is "
                    "truncated or has another dtype (uint16 or uint32)."
                )
            with open(f, "rb") as fh:
                if fh.read(len(_NPY_MAGIC)) == _NPY_MAGIC:
                    raise UserError(
                        f"{key}: {f} is a numpy .npy file with a header; the numpy format reads Dolma's headerless "
                        "token arrays (raw tokens from byte 0)."
                    )
            counts.append(size // self.dtype.itemsize // self.seq_len)
        self._open()
        self._set_counts(counts, key, path)

    _handles = ("_maps",)

    def _open(self) -> None:
        self._maps: dict = {}  # path -> open file (read() keeps the last 64 files read open)

    def _list(self, path: Path) -> tuple[list[Path], list[str]]:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix == ".npy" and p.is_file() and p.name[0] != ".")
            if not files:
                raise UserError(f"{self.key}: {path} holds no .npy files (format numpy).")
            return files, [f.name for f in files]
        if path.suffix != ".txt":
            return [path], [path.name]
        files, names = [], []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            name = line.strip()
            if not name or name.startswith("#"):
                continue
            if "://" in name:
                raise UserError(
                    f"{self.key}: {path} line {number} is a URL ({name}); download the files and list local paths."
                )
            f = Path(name).expanduser()
            f = f if f.is_absolute() else path.parent / f
            if not f.is_file():
                raise UserError(f"{self.key}: {path} line {number} lists {f}, which does not exist.")
            files.append(f)
            names.append(name)  # duplicates kept: OLMo 2 lists some files twice, and trains on them twice
        return files, names

    def read(self, index: int) -> np.ndarray:
        f, local = self._find(index)
        file = self._maps.get(self.files[f])
        if file is None:  # read with pread, not mapped (see _ByteSpace.read); at most 64 files open at a time
            if len(self._maps) >= 64:
                self._maps.pop(next(iter(self._maps))).close()
            file = self._maps[self.files[f]] = open(self.files[f], "rb", buffering=0)
        nbytes = self.seq_len * self.dtype.itemsize
        out = np.empty(self.block_size, dtype=np.int64)
        out[:-1] = np.frombuffer(os.pread(file.fileno(), nbytes, local * nbytes), dtype=self.dtype)
        out[-1] = IGNORE_INDEX
        return out

    def dtype_hint(self) -> str:
        other = "uint16" if self.dtype.itemsize == 4 else "uint32"
        return f"the files may hold {other} tokens, not {self.dtype.name}: try dtype={other}"


def numeric_key(name: str) -> list[object]:
    """Sort key that orders embedded numbers by value: train_2 before train_10 (train_002 and train_2 alike)."""
    return [(0, int(part), part) if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


class JsonlReader(SampleReader):
    """LLM360 jsonl (Amber train_NNN.jsonl, K2 chunk_N.jsonl): one {"token_ids": [...]} sample per line."""

    format = "llm360"

    def __init__(self, path: Path, block_size: int, key: str) -> None:
        self.block_size, self.key = block_size, key
        found = path.iterdir() if path.is_dir() else None  # a directory without .jsonl: "holds no sample" below
        self.files = (
            sorted((p for p in found if p.suffix == ".jsonl"), key=lambda p: numeric_key(p.name)) if found else [path]
        )
        self.names = [f.name for f in self.files]
        self._open()
        self._set_counts([len(o) - 1 for o in self.offsets], key, path)

    _handles = ("offsets", "_fds")

    def _open(self) -> None:
        self.offsets = [line_offsets(f) for f in self.files]
        self._fds: dict[int, int] = {}

    def read(self, index: int) -> np.ndarray:
        f, local = self._find(index)
        if f not in self._fds:
            self._fds[f] = os.open(self.files[f], os.O_RDONLY)
        start, end = int(self.offsets[f][local]), int(self.offsets[f][local + 1])
        line = os.pread(self._fds[f], end - start, start)
        where = f"{self.key}: {self.files[f]} line {local + 1}"
        try:
            ids = json.loads(line)["token_ids"]
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(
                f"{where} is not a JSON object with token_ids ({type(err).__name__}: {str(err)[:80]}); each line "
                'must be {"token_ids": [...]} (LLM360 Amber/K2); a changed file is re-indexed at the next open.'
            ) from None
        if not isinstance(ids, list) or len(ids) != self.block_size:
            found = len(ids) if isinstance(ids, list) else type(ids).__name__
            raise UserError(
                f"{where} has {found} token_ids, but samples must have block_size = data.seq_len + 1 = "
                f"{self.block_size} (Amber lines are 2049 ids: data.seq_len=2048; K2 lines are 2048 ids: "
                "data.seq_len=2047)."
            )
        try:
            return np.asarray(ids, dtype=np.int64)
        except (ValueError, TypeError, OverflowError):
            raise UserError(f"{where} has token_ids that are not all integers.") from None

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)
