"""Tokenizers: load a `tokenizers` tokenizer.json, train a byte-level BPE, tell its end-of-document token, and find
the tokenizer (and EOS) a run's data was prepared with. Used by prepare, export, the lm-eval adapter and samples."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lit_open.checkpoint.hub import HF_PREFIX, resolve_source
from lit_open.data.manifest import MANIFEST
from lit_open.errors import UserError

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
            f"Could not load the tokenizer {file}: {str(err).splitlines()[0] if str(err) else type(err).__name__}. "
            f"tokenizer= must be a Hugging Face `tokenizers` {TOKENIZER_FILE} (as written by "
            "Tokenizer.save or save_pretrained), or a directory holding one."
        ) from None


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
            ) from None
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


def special_token_ids(tokenizer_dir: Path) -> dict[str, int]:
    """bos/eos/pad token ids for an export's config.json, from the tokenizer in `tokenizer_dir` and the token names in
    its tokenizer_config.json (eos: else the usual end-of-document token); {} when there is no usable tokenizer.json."""
    file = Path(tokenizer_dir) / TOKENIZER_FILE
    try:
        tokenizer = load_tokenizer(file)
    except UserError:  # ids are a convenience: the tokenizer files are copied along anyway
        return {}
    names: dict[str, str] = {}
    config_path = file.parent / "tokenizer_config.json"
    try:
        tokenizer_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except (OSError, ValueError):
        tokenizer_config = {}
    for key in ("bos", "pad"):
        value = tokenizer_config.get(f"{key}_token")
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            names[key] = value
    try:
        names["eos"] = resolve_eos(tokenizer, file)[0]
    except UserError:
        pass
    ids = {f"{key}_token_id": tokenizer.token_to_id(token) for key, token in names.items()}
    return {key: value for key, value in ids.items() if value is not None}


def run_tokenizer_dir(config: dict[str, Any]) -> Path | None:
    """The directory of the tokenizer a run's data was prepared with, from its config (as a dict); None if gone."""
    data = config.get("data", {})
    candidates = [Path(data["tokenizer"]).expanduser()] if data.get("tokenizer") else []
    candidates += [Path(s["path"]).expanduser().parent / TOKENIZER_FILE for s in data.get("sources", [])]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.parent
        if (candidate / TOKENIZER_FILE).is_file():
            return candidate
    return None


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
    """The run's tokenizer (data.tokenizer, or the one beside its sources) with the EOS and encoding its training
    sources' manifest records (else the tokenizer's own EOS). `needed_by` names the caller in the error message."""
    directory = run_tokenizer_dir(config)
    if directory is None:
        raise UserError(
            f"{needed_by} needs the run's tokenizer, but neither data.tokenizer nor the directories of data.sources "
            "hold a tokenizer.json. Set data.tokenizer=PATH/tokenizer.json (the one the data was prepared with)."
        )
    tokenizer = load_tokenizer(directory)
    for source in config.get("data", {}).get("sources", []):
        manifest = Path(source["path"]).expanduser() / MANIFEST
        if manifest.is_file():
            info = json.loads(manifest.read_text())
            return RunTokenizer(
                tokenizer, info["tokenizer"]["eos_id"], info.get("add_special_tokens", False), directory
            )
    return RunTokenizer(tokenizer, resolve_eos(tokenizer, directory)[1], False, directory)
