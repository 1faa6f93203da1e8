"""Input discovery and document readers for `lit-open prepare`.

An input is a file, a directory (searched recursively for `DOC_SUFFIXES`), a glob, the word `stdlib` (the
Python standard library's own sources), or a Hugging Face dataset (`lit_open.data.hf_datasets`: `hf-dataset:...`,
or a directory written by `save_to_disk`), read in shards that stand in for files. Every file is named by its path
relative to the input's root (its `key`); the key and the document's index in the file decide, by a stable hash,
whether the document is held out. Text is UTF-8: bytes that are not are replaced by U+FFFD (as errors="replace"
does) and counted (`ReadStats`), so that prepare can say which files had them.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import io
import json
import os
import re
import sysconfig
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lit_open.data import hf_datasets
from lit_open.data.hf_datasets import DatasetShard
from lit_open.errors import UserError

STDLIB = "stdlib"
DOC_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".txt", ".md", ".parquet", ".py")
# Path components left out of `stdlib`: test suites and bulky parts that are not library code.
STDLIB_SKIP = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "__pycache__", "site-packages", "dist-packages"}
)
_GLOB_CHARS = frozenset("*?[")
_PARQUET_BATCH_ROWS = 1024
_REPLACE = "lit_open.replace_counted"  # errors= handler: Python's "replace", counting the bytes it replaces
_replaced = threading.local()  # .bytes: bytes replaced by this thread so far


def _replace_counted(err: UnicodeError) -> tuple[str, int]:
    if not isinstance(err, UnicodeDecodeError):
        raise err
    _replaced.bytes = getattr(_replaced, "bytes", 0) + err.end - err.start
    return "\ufffd", err.end


codecs.register_error(_REPLACE, _replace_counted)


@dataclass(frozen=True)
class InputFile:
    path: str  # absolute path (a dataset shard: the input as given)
    key: str  # path relative to the input's root, '/'-separated; with the document index it decides the split
    source: int  # index of the input (in `inputs`) that found the file
    size: int  # bytes on disk (a dataset shard: bytes of text, about)
    dataset: DatasetShard | None = None  # the shard of a dataset input this stands for
    revision: str | None = None  # a dataset's hub commit or save_to_disk fingerprint, recorded in the manifest


def discover(
    inputs: Sequence[str], exclude: Sequence[str | Path] = (), text_key: str = "text"
) -> list[list[InputFile]]:
    """The files of every input, each list in sorted order. UserError for a missing input or one without files.

    `exclude`: directories whose files are never taken (prepare's own output, so that a re-run over `.` does not
    read the dataset it wrote). `text_key`: the column a dataset input must have.
    """
    if not inputs:
        raise UserError(
            "No inputs to prepare: set inputs= to a list of files, directories, globs, the word 'stdlib' "
            "(the Python standard library's sources) or hf-dataset:ORG/NAME datasets, e.g. "
            "inputs='[data/corpus.jsonl,docs/]'."
        )
    excluded = [os.path.realpath(p) for p in exclude]
    return [_discover_one(str(spec), i, excluded, text_key) for i, spec in enumerate(inputs)]


def _discover_one(spec: str, source: int, excluded: list[str], text_key: str) -> list[InputFile]:
    if _is_dataset(spec):
        ds = hf_datasets.open_input(spec, text_key)
        return [InputFile(spec, f"{ds.label}#{s.index}", source, ds.shard_bytes, s, ds.revision) for s in ds.shards]
    if spec == STDLIB:
        root, paths = stdlib_files()
        found = [(p, root) for p in paths]
    else:
        path = Path(spec).expanduser()
        if path.is_file():
            found = [(path, path.parent)]
        elif path.is_dir():
            found = [(p, path) for p in _walk(path)]
        elif any(c in _GLOB_CHARS for c in spec):
            root = _glob_root(spec)
            found = []
            for match in sorted(glob.glob(os.path.expanduser(spec), recursive=True)):
                m = Path(match)
                if m.is_file():
                    found.append((m, root))
                elif m.is_dir():
                    found.extend((p, root) for p in _walk(m))
            if not found:
                raise UserError(
                    f"The input glob '{spec}' matches no files. Check the pattern (use '**' to search "
                    "subdirectories, and quote it so the shell leaves it alone), or give files, directories, or "
                    "'stdlib'."
                )
        else:
            raise UserError(
                f"The input '{spec}' does not exist (looked for {path.absolute()}). An input is a file, a directory, "
                "a glob such as 'data/**/*.jsonl', or the word 'stdlib'."
            )
    files: dict[str, InputFile] = {}
    for p, root in found:
        real = os.path.realpath(p)
        if any(real == d or real.startswith(d + os.sep) for d in excluded):
            continue
        key = Path(os.path.relpath(p, root)).as_posix()
        files.setdefault(key, InputFile(path=os.path.abspath(p), key=key, source=source, size=os.path.getsize(p)))
    if not files:
        accepted = ", ".join(f"*{s}" for s in DOC_SUFFIXES)
        raise UserError(
            f"The input '{spec}' holds no files to read. Directories are searched recursively for {accepted} "
            "(hidden files and __pycache__ are skipped); name other files directly or with a glob."
        )
    return [files[k] for k in sorted(files)]


def _is_dataset(spec: str) -> bool:
    return spec.startswith(hf_datasets.PREFIX) or hf_datasets.is_saved_dataset(Path(spec).expanduser())


def input_names(inputs: Sequence[str]) -> list[str]:
    """A short, unique name per input (its `val-<name>` split): a file's name without its document suffix, a
    directory's name, a glob's fixed directory, `stdlib`, or a dataset's NAME[-CONFIG][-SPLIT]; characters other
    than letters, digits and `_.-` become `_`, and a name taken before gets `-2`, `-3`, ..."""
    names: list[str] = []
    for spec in map(str, inputs):
        if spec == STDLIB:
            base = STDLIB
        elif spec.startswith(hf_datasets.PREFIX):
            base = hf_datasets.input_name(spec)
        else:
            path = Path(spec).expanduser()
            if not path.exists() and any(c in _GLOB_CHARS for c in spec):
                path = _glob_root(spec)
            base = path.absolute().name
            lower = base.lower()
            base = next((base[: -len(s)] for s in DOC_SUFFIXES if lower.endswith(s) and len(base) > len(s)), base)
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", base).strip(".") or "input"
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names


def _walk(root: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        out.extend(Path(dirpath, f) for f in filenames if not f.startswith(".") and f.lower().endswith(DOC_SUFFIXES))
    return out


def _glob_root(pattern: str) -> Path:
    """The directory a glob is relative to: its leading components without glob characters."""
    parts = Path(os.path.expanduser(pattern)).parts
    fixed = []
    for part in parts[:-1]:
        if any(c in _GLOB_CHARS for c in part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def stdlib_files() -> tuple[Path, list[Path]]:
    """The Python standard library's own `.py` files (no site-packages, test suites, IDLE, lib2to3, ...)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise UserError(f"The input 'stdlib' needs the Python standard library sources, but {root} is missing.")
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP)
        paths.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return root, sorted(paths)


@dataclass
class ReadStats:
    """What reading a file had to repair."""

    undecodable_bytes: int = 0  # bytes that are not UTF-8 (replaced by U+FFFD)


@contextmanager
def _counting(stats: ReadStats | None) -> Iterator[None]:
    """Adds the bytes the decoding inside the block replaced to `stats` (exact per file: decoding is synchronous)."""
    before = getattr(_replaced, "bytes", 0)
    try:
        yield
    finally:
        if stats is not None:
            stats.undecodable_bytes += getattr(_replaced, "bytes", 0) - before


def is_held_out(key: str, index: int, val_fraction: float) -> bool:
    """Whether document `index` of the file named `key` belongs to the validation split (stable across runs)."""
    if val_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(f"{key}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction


def read_input(f: InputFile, text_key: str = "text", stats: ReadStats | None = None) -> Iterator[tuple[int, str]]:
    """`iter_documents` of a file, or the rows of a dataset shard."""
    if f.dataset is not None:
        where = f"shard {f.dataset.index} of {f.dataset.count} of the input {f.path!r}"
        return column_texts(where, text_key, hf_datasets.shard_column(f.dataset, text_key, where))
    return iter_documents(f.path, text_key, stats)


def iter_documents(
    path: str | Path, text_key: str = "text", stats: ReadStats | None = None
) -> Iterator[tuple[int, str]]:
    """Yield `(index, text)` for every non-empty document of a file, in file order.

    `index` counts the file's records (JSON objects, parquet rows), the empty ones included, so that it stays
    stable; a whole-text file (txt, md, py, anything else) is one document with index 0. Bytes that are not UTF-8
    become U+FFFD; `stats`, when given, counts them (over the file's records read so far, empty ones included).
    """
    path = str(path)
    name = path.lower()
    compressed = name.endswith(".gz")
    inner = name[:-3] if compressed else name
    try:
        if inner.endswith((".jsonl", ".json")):
            yield from _iter_json(path, compressed, text_key, stats)
        elif inner.endswith(".parquet") and not compressed:
            yield from _iter_parquet(path, text_key)
        else:
            with gzip.open(path, "rb") if compressed else open(path, "rb") as f, _counting(stats):
                text = f.read().decode("utf-8", errors=_REPLACE)
            if text and not text.isspace():
                yield 0, text
    except UserError:
        raise
    except (OSError, EOFError, ValueError) as err:  # unreadable, truncated or corrupt gzip, bad parquet
        raise UserError(f"Could not read the input file {path}: {err}. Fix or remove the file.") from None


def _iter_json(path: str, compressed: bool, text_key: str, stats: ReadStats | None) -> Iterator[tuple[int, str]]:
    raw = gzip.open(path, "rb") if compressed else open(path, "rb")
    array = path.lower().removesuffix(".gz").endswith(".json") and raw.peek(256).lstrip().startswith(b"[")
    with io.TextIOWrapper(raw, encoding="utf-8", errors=_REPLACE) as f:
        if array:  # a .json file holding one array of objects
            try:
                with _counting(stats):
                    records = json.load(f)
            except json.JSONDecodeError as err:
                raise UserError(
                    f"{path} is not valid JSON ({err}). JSON inputs hold one JSON object per line, or one array."
                ) from None
            for index, record in enumerate(records):
                text = _text_of(record, text_key, f"{path}, element {index}")
                if text and not text.isspace():
                    yield index, text
            return
        index = 0
        for line_no, line in enumerate(_lines(f, stats), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(
                    f"{path}, line {line_no}: not valid JSON ({err.msg}). JSON inputs (.jsonl, .json, .jsonl.gz) "
                    "must hold one JSON object per line."
                ) from None
            text = _text_of(record, text_key, f"{path}, line {line_no}")
            if text and not text.isspace():
                yield index, text
            index += 1


def _lines(f: io.TextIOWrapper, stats: ReadStats | None) -> Iterator[str]:
    """The lines of `f`, counting the bytes replaced while reading each (decoding happens as lines are read)."""
    lines = iter(f)
    while True:
        with _counting(stats):
            line = next(lines, None)
        if line is None:
            return
        yield line


def _text_of(record: object, text_key: str, where: str) -> str | None:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object with a '{text_key}' field, got {type(record).__name__}.")
    if text_key not in record:
        keys = ", ".join(repr(k) for k in list(record)[:10]) or "none"
        strings = [k for k, v in record.items() if isinstance(v, str)]
        hint = f" (e.g. text_key={strings[0]})" if strings else ""
        raise UserError(
            f"{where}: the JSON object has no '{text_key}' field (its keys: {keys}). Set text_key= to the field "
            f"that holds the text{hint}."
        )
    text = record[text_key]
    if text is None or isinstance(text, str):
        return text
    raise UserError(
        f"{where}: field '{text_key}' holds a {type(text).__name__}, not text. Set text_key= to a text field."
    )


def _iter_parquet(path: str, text_key: str) -> Iterator[tuple[int, str]]:
    import pyarrow.parquet as pq  # slow to import: only parquet inputs need it

    pf = pq.ParquetFile(path)
    columns = pf.schema_arrow.names
    if text_key not in columns:
        raise UserError(
            f"{path}: the parquet file has no column '{text_key}' (its columns: {', '.join(columns[:20])}). Set "
            "text_key= to the column that holds the text."
        )
    batches = pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_key])
    yield from column_texts(str(path), text_key, (batch.column(0).to_pylist() for batch in batches))


def column_texts(where: str, text_key: str, batches: Iterable[list[Any]]) -> Iterator[tuple[int, str]]:
    """(row, text) for the rows of a text column, read in batches, that hold more than whitespace; a value that is
    not text is a UserError naming `where` and the row."""
    index = 0
    for values in batches:
        for text in values:
            if text is not None and not isinstance(text, str):
                raise UserError(
                    f"{where}, row {index}: column '{text_key}' holds {type(text).__name__} values, not text. Set "
                    "text_key= to a text column."
                )
            if text and not text.isspace():
                yield index, text
            index += 1
