"""Tokenizers: load a `tokenizers` tokenizer.json, train a byte-level BPE, tell its end-of-document token, and find
the tokenizer (and EOS) a run's data was prepared with. Used by prepare, export, the lm-eval adapter and samples.

A tokenizer's identity is the SHA-256 of its tokenizer.json, which every prepared split's manifest records
(`manifest["tokenizer"]["sha256"]`): `check_tokenizer_matches` refuses a tokenizer that is not the one some data
was prepared with, and `data_tokenizer_file` finds the run's tokenizer that is (what exports ship)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lit_open.checkpoint.hub import HF_PREFIX, resolve_source
from lit_open.data.manifest import MANIFEST, read_manifest
from lit_open.errors import UserError, first_line

DEFAULT_EOS = "<|endoftext|>"
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")
TOKENIZER_FILE = "tokenizer.json"


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer.json that `path` names: the file itself, the one in a directory, or the one of a Hugging Face
    source (`hf:ORG/NAME@REVISION`, `hf:/local/dir`: the tokenizer a checkpoint to fine-tune was trained with)."""
    if str(path).startswith(HF_PREFIX):
        path = resolve_source(str(path))[0]
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / TOKENIZER_FILE).is_file():
            return p / TOKENIZER_FILE
        other = [n for n in ("tokenizer.model", "vocab.json", "spiece.model") if (p / n).exists()]
        hint = (
            f" It has {', '.join(other)}: save it in the fast format first, e.g. with transformers: "
            f"AutoTokenizer.from_pretrained('{p}').save_pretrained('{p}')."
            if other
            else ""
        )
        raise UserError(
            f"The tokenizer directory {p} holds no {TOKENIZER_FILE}.{hint} Give tokenizer= a Hugging Face "
            f"`tokenizers` {TOKENIZER_FILE} or a directory holding one, or leave it unset to train a BPE."
        )
    if not p.is_file():
        raise UserError(
            f"The tokenizer {p} does not exist. Give tokenizer= a Hugging Face `tokenizers` {TOKENIZER_FILE} or a "
            "directory holding one, or leave it unset to train a byte-level BPE on the inputs."
        )
    return p


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json (or the one in a directory). UserError if it is missing or unreadable."""
    file = tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception for bad files
        raise UserError(
            f"Could not load the tokenizer {file}: {first_line(err) or type(err).__name__}. "
            f"tokenizer= must be a Hugging Face `tokenizers` {TOKENIZER_FILE} (as written by "
            "Tokenizer.save or save_pretrained), or a directory holding one."
        ) from err


def resolve_eos(tokenizer: Tokenizer, path: str | Path, eos_token: str | None = None) -> tuple[str, int]:
    """The end-of-document token and its id: `eos_token` if given, else the `eos_token` of a tokenizer_config.json
    next to the tokenizer, else the first of `EOS_CANDIDATES` in the vocabulary. UserError if none is found."""
    file = tokenizer_file(path)
    if eos_token:
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise UserError(
                f"eos_token={eos_token!r} is not in the vocabulary of the tokenizer {file}. Pass the token that "
                "ends a document in this tokenizer (e.g. one of its special tokens)."
            )
        return eos_token, eos_id
    config_path = file.parent / "tokenizer_config.json"
    if config_path.is_file():
        try:
            value = json.loads(config_path.read_text()).get("eos_token")
        except (OSError, ValueError, AttributeError) as err:
            raise UserError(
                f"Could not read {config_path}: {err}. Fix it, or pass eos_token= to name the end-of-document token."
            ) from err
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            eos_id = tokenizer.token_to_id(value)
            if eos_id is None:
                raise UserError(
                    f"{config_path} names eos_token {value!r}, which is not in the vocabulary of {file}. Pass "
                    "eos_token= to name the end-of-document token."
                )
            return value, eos_id
    for candidate in EOS_CANDIDATES:
        eos_id = tokenizer.token_to_id(candidate)
        if eos_id is not None:
            return candidate, eos_id
    raise UserError(
        f"Could not tell the end-of-document token of the tokenizer {file}: no eos_token= was given, there is no "
        f"tokenizer_config.json with an eos_token next to it, and none of {', '.join(EOS_CANDIDATES)} is in its "
        "vocabulary. Pass eos_token= with the token that ends a document."
    )


def token_dtype(tokenizer: Tokenizer) -> str:
    """ "uint16" when every token id fits in it (a vocabulary of at most 65536), else "int32"."""
    max_id = max([tokenizer.get_vocab_size(with_added_tokens=True) - 1, *tokenizer.get_vocab(True).values()])
    return "uint16" if max_id <= np.iinfo(np.uint16).max else "int32"


def train_bpe(texts: Iterable[str], vocab_size: int, eos_token: str = DEFAULT_EOS) -> Tokenizer:
    """A byte-level BPE (GPT-2 style, no prefix space) trained on `texts`, with `eos_token` as id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


# ------------------------------------------------------------------------------------------------- internals


def tokenizer_and_eos(path: str | Path) -> tuple[Tokenizer, int]:
    """The tokenizer of a tokenizer.json (or the one in a directory) and the id of the token that ends a document."""
    tokenizer = load_tokenizer(path)
    return tokenizer, resolve_eos(tokenizer, path)[1]


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file: a tokenizer's identity, as the manifests of prepared data record it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepared_tokenizer(source_dir: str | Path) -> Path | None:
    """The tokenizer.json that `lit-open prepare` wrote beside a prepared split (`<output>/tokenizer.json` for
    `<output>/train`), if it is still the one the split's manifest records; else None."""
    source_dir = Path(source_dir).expanduser()
    beside = source_dir.parent / TOKENIZER_FILE
    if not beside.is_file() or not (source_dir / MANIFEST).is_file():
        return None
    return beside if file_sha256(beside) == read_manifest(source_dir)["tokenizer"]["sha256"] else None


def check_tokenizer_matches(
    tokenizer: str | Path, source_dirs: Iterable[str | Path], key: str, fix: str | None = None
) -> None:
    """Refuse `tokenizer` (a tokenizer.json, or a directory holding one) unless every prepared split in
    `source_dirs` was tokenized with it: its SHA-256 must be the one each split's manifest records.

    The UserError names the tokenizer file and its hash, the manifest and its hash, the data's own tokenizer when it
    is beside the data, and what to do. `key` is the config key the tokenizer came from (e.g. data.tokenizer);
    `fix`, when given, replaces the default advice (set `key` to the data's tokenizer, or prepare the data again
    with this one).
    """
    file = tokenizer_file(tokenizer)
    sha = None
    for source in source_dirs:
        source = Path(source).expanduser()
        expected = read_manifest(source)["tokenizer"]["sha256"]
        sha = sha or file_sha256(file)
        if sha == expected:
            continue
        data_tokenizer = prepared_tokenizer(source)
        found = f"; the data's tokenizer is {data_tokenizer}" if data_tokenizer else ""
        if fix is None:
            fix = (
                f"Set {key}={data_tokenizer or 'PATH (the tokenizer.json the data was prepared with)'}, or prepare "
                f"the data again with this tokenizer (`lit-open prepare inputs=[...] output=DIR tokenizer={file}`)."
            )
        raise UserError(
            f"The tokenizer {file} (given by {key}; SHA-256 {sha}) is not the one the data {source} was prepared with: "
            f"{source / MANIFEST} records SHA-256 {expected}{found}. A token id stands for other text under "
            f"another tokenizer, so a loss, a benchmark score or an export made with it would be meaningless. {fix}"
        )


def prepared_sources(config: dict[str, Any]) -> list[Path]:
    """The training sources (data.sources) of a run's config (as a dict) whose prepared data is here (a manifest)."""
    sources = [Path(s["path"]).expanduser() for s in config.get("data", {}).get("sources", [])]
    return [source for source in sources if (source / MANIFEST).is_file()]


def data_tokenizer_file(config: dict[str, Any], fix: str | None = None) -> Path | None:
    """The tokenizer.json a run's training data was prepared with, from the run's config (as a dict):
    data.tokenizer when set and present, else the one beside a source of data.sources; None when there is none.

    It is checked against the manifests of the training sources that are present (`check_tokenizer_matches`,
    key data.tokenizer, advice `fix`): a configured tokenizer that is not the data's is a UserError, never shipped
    or used in its place. Without the data (another machine) it cannot be checked and is returned as found.
    """
    data = config.get("data", {})
    candidates = [Path(data["tokenizer"]).expanduser()] if data.get("tokenizer") else []
    candidates += [Path(s["path"]).expanduser().parent / TOKENIZER_FILE for s in data.get("sources", [])]
    for candidate in candidates:
        file = candidate / TOKENIZER_FILE if candidate.is_dir() else candidate
        if file.is_file():
            check_tokenizer_matches(file, prepared_sources(config), "data.tokenizer", fix)
            return file
    return None


def run_tokenizer_dir(config: dict[str, Any]) -> Path | None:
    """The directory of the tokenizer a run's data was prepared with (`data_tokenizer_file`); None if gone."""
    file = data_tokenizer_file(config)
    return file.parent if file is not None else None


def export_tokenizer_configs(
    tokenizer_json: Path, model_max_length: int, eos_token: str | None = None
) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """What an export writes beside a copy of `tokenizer_json` so that transformers' AutoTokenizer and lm-eval's
    Hugging Face runner read it as is, and the bos/eos/pad ids for its config.json.

    Returns ({file name: JSON object}, ids). tokenizer_config.json is the one beside `tokenizer_json` (if any) with
    `eos_token` set to the data's end-of-document token and, unless it says otherwise, `tokenizer_class`
    PreTrainedTokenizerFast and `model_max_length`; a special_tokens_map.json beside it gets the same eos_token.
    The end-of-document token is `eos_token` if given, else the one recorded by the manifest of a split prepared
    beside the tokenizer (`<output>/train`, `<output>/val`; a manifest of another tokenizer is refused), else the
    tokenizer's own (`resolve_eos`); without one, no eos_token is written.
    """
    directory = tokenizer_json.parent
    existing = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        try:  # only a tokenizer.json's own siblings describe it
            value = json.loads(path.read_text()) if tokenizer_json.name == TOKENIZER_FILE and path.is_file() else None
        except (OSError, ValueError):
            value = None
        existing[name] = value if isinstance(value, dict) else None
    tokenizer_config = dict(existing["tokenizer_config.json"] or {})
    tokenizer_config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    tokenizer_config.setdefault("model_max_length", model_max_length)
    try:
        tokenizer = load_tokenizer(tokenizer_json)
    except UserError:  # the files are copied along anyway; ids and EOS are a convenience
        return {"tokenizer_config.json": tokenizer_config}, {}
    if eos_token is None:
        splits = [directory / split for split in ("train", "val") if (directory / split / MANIFEST).is_file()]
        if splits:
            check_tokenizer_matches(tokenizer_json, splits, "tokenizer_dir")
            eos_token = read_manifest(splits[0])["tokenizer"]["eos_token"]
    if eos_token is None:
        try:
            eos_token = resolve_eos(tokenizer, tokenizer_json)[0]
        except UserError:
            pass
    files = {"tokenizer_config.json": tokenizer_config}
    names = {}
    for key in ("bos", "pad"):
        value = tokenizer_config.get(f"{key}_token")
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            names[key] = value
    if eos_token is not None:
        names["eos"] = eos_token
        current = tokenizer_config.get("eos_token")
        if (current.get("content") if isinstance(current, dict) else current) != eos_token:
            tokenizer_config["eos_token"] = eos_token
        special = existing["special_tokens_map.json"]
        if special is not None and "eos_token" in special:
            files["special_tokens_map.json"] = {**special, "eos_token": eos_token}
    ids = {f"{key}_token_id": tokenizer.token_to_id(token) for key, token in names.items()}
    return files, {key: value for key, value in ids.items() if value is not None}


@dataclass
class RunTokenizer:
    """The tokenizer a run's documents were encoded with, and how: text for the model looks like training data."""

    tokenizer: Tokenizer
    eos_id: int  # the token that ends every training document
    add_special_tokens: bool  # whether prepare let the tokenizer add its own special tokens
    directory: Path  # holds tokenizer.json (and tokenizer_config.json, ...): copied along with exports

    def encode_document_start(self, text: str) -> list[int]:
        """`text` as the start of a training document: after the previous document's EOS."""
        return [self.eos_id, *self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens).ids]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def run_tokenizer(config: dict[str, Any], needed_by: str) -> RunTokenizer:
    """The run's tokenizer (`data_tokenizer_file`: data.tokenizer, or the one beside its sources, checked against
    them) with the EOS and encoding its training sources' manifest records (else the tokenizer's own EOS).
    `needed_by` names the caller in the error message."""
    file = data_tokenizer_file(config)
    if file is None:
        raise UserError(
            f"{needed_by} needs the run's tokenizer, but neither data.tokenizer nor the directories of data.sources "
            "hold a tokenizer.json. Set data.tokenizer=PATH/tokenizer.json (the one the data was prepared with)."
        )
    tokenizer = load_tokenizer(file)
    for source in config.get("data", {}).get("sources", []):
        manifest = Path(source["path"]).expanduser() / MANIFEST
        if manifest.is_file():
            info = json.loads(manifest.read_text())
            return RunTokenizer(
                tokenizer, info["tokenizer"]["eos_id"], info.get("add_special_tokens", False), file.parent
            )
    return RunTokenizer(tokenizer, resolve_eos(tokenizer, file)[1], False, file.parent)
