"""Hugging Face datasets as `lit-open prepare` inputs, read through the `datasets` library.

    hf-dataset:ORG/NAME[/CONFIG][@REVISION][:SPLIT]   a hub dataset, streamed (nothing is downloaded whole)
    hf-dataset:PATH[:SPLIT]                            a local directory: written by `save_to_disk`, or data files
                                                       `load_dataset` reads (parquet, jsonl, a downloaded hub repo)
    PATH                                               a directory written by `save_to_disk`, as hf-dataset:PATH

SPLIT defaults to `train`; a directory holding one saved `Dataset` has no splits to name. A hub dataset is read at
the commit its revision (default: the main branch) resolves to when prepare starts, and that commit is recorded.
Offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set) the revision is looked up in the huggingface_hub cache, where
`hf download --repo-type dataset` puts it, and read from there.

A dataset is read in shards, the `datasets` library's own (a hub or local dataset's data files; a saved dataset's
arrow files), so that prepare's workers read them in parallel, each as one input file. A document is named by
`<dataset>:<split>#<shard>` and its row in the shard: that key decides whether it is held out.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lit_open.checkpoint.hub import hub_answer, hub_offline
from lit_open.errors import UserError, first_line

PREFIX = "hf-dataset:"
DEFAULT_SPLIT = "train"
_BATCH_ROWS = 1024
# A shard whose size the dataset does not state counts as this many bytes of text when prepare spreads the work
# over its worker processes (about one worker per shard).
_SHARD_BYTES_GUESS = 64 << 20
_TEXT_DTYPES = ("string", "large_string")
_GRAMMAR = (
    "hf-dataset:ORG/NAME[/CONFIG][@REVISION][:SPLIT] (a hub dataset), hf-dataset:PATH[:SPLIT] (a local directory), "
    "e.g. hf-dataset:allenai/c4/en@main:validation"
)


@dataclass(frozen=True)
class DatasetShard:
    """One shard of a dataset input: what a worker process needs to open and read it."""

    path: str  # what load_dataset opens (a hub id or a local directory), or the save_to_disk directory
    config: str | None
    revision: str | None  # the hub commit load_dataset reads; None for a local directory
    split: str | None  # None: a saved Dataset (one split)
    from_disk: bool  # a save_to_disk directory (datasets.load_from_disk)
    index: int
    count: int  # shards of the split


@dataclass(frozen=True)
class DatasetInput:
    """A dataset input resolved at start-up."""

    label: str  # <dataset>:<split> (no revision, no location): with the shard, the key of its documents
    revision: str | None  # recorded in the manifest: the hub commit, or a saved dataset's fingerprint
    shards: list[DatasetShard]
    shard_bytes: int  # bytes of text per shard, about (for spreading the work)


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a directory that `Dataset.save_to_disk` or `DatasetDict.save_to_disk` wrote."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def open_input(spec: str, text_key: str) -> DatasetInput:
    """Resolve a dataset input; UserError (naming the cause) for one that cannot be read as asked."""
    local, dataset, revision, split = _parse(spec)
    if local is None:
        parts = dataset.split("/")
        load_path, load_revision, commit = _resolve_hub(spec, "/".join(parts[:2]), revision)
        config = parts[2] if len(parts) == 3 else None
        return _open_streamed(spec, (load_path, config, load_revision), split, text_key, dataset, commit)
    if is_saved_dataset(local):
        return _open_saved(spec, local, split, text_key, dataset)
    if not local.is_dir():
        raise UserError(
            f"The input {spec!r}: {local} is not a directory. A local dataset is a directory written by "
            f"save_to_disk, or a directory of data files (parquet, jsonl, csv, ...). Inputs: {_GRAMMAR}."
        )
    return _open_streamed(spec, (str(local), None, None), split, text_key, dataset, None)


def input_name(spec: str) -> str:
    """The input's short name: NAME[-CONFIG] of a hub dataset or a directory's name, then -SPLIT for a split other
    than the default."""
    local, dataset, _, split = _parse(spec)
    base = dataset if local is not None else dataset.partition("/")[2]
    return "-".join([*base.split("/"), *([split] if split not in (None, DEFAULT_SPLIT) else [])])


def shard_column(shard: DatasetShard, text_key: str, where: str) -> Iterator[list[Any]]:
    """The shard's `text_key` column, in order, in batches of rows (`readers.column_texts` takes the texts)."""
    try:
        ds = _open_split(shard.path, shard.config, shard.revision, shard.split, shard.from_disk, shard.count)
        if ds.n_shards != shard.count:
            raise UserError(
                f"{where}: the dataset now has {ds.n_shards} shards, not the {shard.count} it had when prepare "
                "started. Keep it unchanged while prepare runs, and run prepare again."
            )
        for batch in ds.shard(shard.count, shard.index, contiguous=True).select_columns([text_key]).iter(_BATCH_ROWS):
            yield batch[text_key]
    except UserError:
        raise
    except Exception as err:  # the hub went away, a corrupt file: either way this shard could not be read
        raise UserError(
            f"Could not read {where}: {type(err).__name__}: {first_line(err)}. Check the connection to the hub (or "
            "the files), and run prepare again."
        ) from err


# ------------------------------------------------------------------------------------------------------ helpers


def _parse(spec: str) -> tuple[Path | None, str, str | None, str | None]:
    """(local directory or None for the hub, ORG/NAME[/CONFIG] or the directory's name, revision, split)."""
    rest = spec.removeprefix(PREFIX)
    if not rest:
        raise UserError(f"The input {spec!r} names no dataset. Give {_GRAMMAR}.")
    whole = Path(rest).expanduser()
    head, colon, split = rest.rpartition(":")
    if whole.exists():  # a local directory, as hf:/dir is for checkpoints
        return whole, whole.absolute().name, None, None
    if colon and head and Path(head).expanduser().exists():
        return Path(head).expanduser(), Path(head).expanduser().absolute().name, None, split
    if rest.startswith(("/", ".", "~")):
        raise UserError(f"The input {spec!r}: no such directory {str(whole.absolute())!r}. Inputs: {_GRAMMAR}.")
    ref, colon, split = rest.partition(":")
    dataset, at, revision = ref.partition("@")
    parts = dataset.split("/")
    if len(parts) not in (2, 3) or not all(parts) or (at and not revision) or (colon and not split):
        raise UserError(f"The input {spec!r} is not a dataset input. Give {_GRAMMAR}.")
    return None, dataset, revision or None, split or None


def _resolve_hub(spec: str, repo: str, revision: str | None) -> tuple[str, str | None, str]:
    """(what load_dataset opens, the revision it reads, the commit to record) of a hub dataset at `revision`."""
    # imported here: only hub inputs need it, and it loads an HTTP stack
    import huggingface_hub

    where = f"{repo} at revision {revision or 'main'}"
    if hub_offline("HF_DATASETS_OFFLINE"):
        try:
            snapshot = huggingface_hub.snapshot_download(
                repo, repo_type="dataset", revision=revision, local_files_only=True
            )
        except Exception as err:  # noqa: BLE001 - any failure here means: not in the cache
            refs = Path(huggingface_hub.constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}" / "refs"
            cached = sorted(p.relative_to(refs).as_posix() for p in refs.rglob("*") if p.is_file())
            held = f" (it holds the revisions {', '.join(cached)})" if cached else ""
            raise UserError(
                f"The input {spec!r}: the dataset {where} is not in the huggingface_hub cache "
                f"{huggingface_hub.constants.HF_HUB_CACHE}{held}, and offline mode (HF_HUB_OFFLINE or "
                "HF_DATASETS_OFFLINE) keeps the hub from being asked. Where the hub can be reached, run `hf download "
                f"{repo} --repo-type dataset{' --revision ' + revision if revision else ''}` to put it in the "
                "cache (or add --local-dir DIR and give hf-dataset:DIR:SPLIT), or unset offline mode."
            ) from err
        return snapshot, None, Path(snapshot).name
    try:
        commit = huggingface_hub.HfApi().dataset_info(repo, revision=revision).sha
    except Exception as err:  # no network, a hub error: the dataset could not be looked up
        known = hub_answer(err, f"The input {spec!r}", repo, revision, "dataset", hint=f"The grammar: {_GRAMMAR}.")
        if known is not None:
            raise known from err
        raise UserError(
            f"The input {spec!r}: could not look up the dataset {where} on the hub ({type(err).__name__}: "
            f"{first_line(err)}). Check the connection, or set HF_HUB_OFFLINE=1 to read it from the local cache."
        ) from err
    return repo, commit, commit


def _open_streamed(
    spec: str,
    load: tuple[str, str | None, str | None],
    split: str | None,
    text_key: str,
    dataset: str,
    commit: str | None,
) -> DatasetInput:
    """A dataset that load_dataset reads, streamed; `load` is its (path, config, revision)."""
    import datasets  # slow to import: only dataset inputs need it

    path, config, revision = load
    try:
        splits = datasets.load_dataset(path, name=config, revision=revision, streaming=True)
    except Exception as err:  # a missing config, no data files, an unreadable file: each names itself
        raise UserError(
            f"Could not open the input {spec!r}: {type(err).__name__}: {first_line(err)}. Inputs: {_GRAMMAR}."
        ) from err
    chosen = split or DEFAULT_SPLIT
    ds = _check_split(spec, splits, chosen)
    _check_text_key(spec, ds.features, text_key)
    count = ds.n_shards
    stated = (ds.info.splits or {}).get(chosen)
    shard_bytes = stated.num_bytes // count if stated is not None and stated.num_bytes else _SHARD_BYTES_GUESS
    shards = [DatasetShard(path, config, revision, chosen, False, i, count) for i in range(count)]
    return DatasetInput(f"{dataset}:{chosen}", commit, shards, shard_bytes)


def _open_saved(spec: str, path: Path, split: str | None, text_key: str, dataset: str) -> DatasetInput:
    """A directory written by save_to_disk, read in its arrow files' shards."""
    import datasets  # slow to import: only dataset inputs need it

    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as err:  # truncated or foreign files
        raise UserError(f"Could not open the saved dataset {path} (input {spec!r}): {first_line(err)}.") from err
    if isinstance(saved, datasets.Dataset):
        if split is not None:
            raise UserError(
                f"The input {spec!r}: {path} holds one saved Dataset, not a DatasetDict, so it has no split "
                f"{split!r} to choose. Drop ':{split}'."
            )
        ds, chosen, label, state = saved, None, dataset, path / "state.json"
    else:
        chosen = split or DEFAULT_SPLIT
        ds = _check_split(spec, saved, chosen)
        label, state = f"{dataset}:{chosen}", path / chosen / "state.json"
    _check_text_key(spec, ds.features, text_key)
    fingerprint = json.loads(state.read_text()).get("_fingerprint")
    count = max(1, min(len(ds.cache_files), len(ds)))
    shard_bytes = sum(os.path.getsize(f["filename"]) for f in ds.cache_files) // count
    shards = [DatasetShard(str(path), None, None, chosen, True, i, count) for i in range(count)]
    return DatasetInput(label, fingerprint, shards, shard_bytes)


def _check_split(spec: str, splits: Any, split: str) -> Any:
    if split not in splits:
        raise UserError(
            f"The input {spec!r} has no split {split!r}; its splits: {', '.join(splits)}. Name one after the last "
            "colon (:SPLIT)."
        )
    return splits[split]


def _check_text_key(spec: str, features: Any, text_key: str) -> None:
    """UserError when the features (when stated) have no text column `text_key`."""
    if features is None:  # not stated by the dataset: each row is checked as it is read
        return
    if text_key not in features:
        raise UserError(
            f"The input {spec!r} has no column '{text_key}' (its columns: {', '.join(list(features)[:20])}). Set "
            "text_key= to the column that holds the text."
        )
    if getattr(features[text_key], "dtype", None) not in _TEXT_DTYPES:
        raise UserError(
            f"The input {spec!r}: column '{text_key}' holds {features[text_key]}, not text. Set text_key= to a text "
            "column."
        )


@functools.lru_cache(maxsize=4)  # a worker reads the shards of one dataset one after another: open it once
def _open_split(path: str, config: str | None, revision: str | None, split: str | None, saved: bool, count: int):
    import datasets  # slow to import: only dataset inputs need it

    if saved:
        ds = datasets.load_from_disk(path)
        return (ds if split is None else ds[split]).to_iterable_dataset(num_shards=count)
    return datasets.load_dataset(path, name=config, revision=revision, split=split, streaming=True)
