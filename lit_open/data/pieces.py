"""Tokenizing a long text in pieces, with exactly the tokens the whole text has, so that memory stays bounded.

A tokenizer holds about 150 bytes per token while it encodes (offsets, token strings, the pre-tokenizer's
alignments), so a 21 MB document would take gigabytes at once. `encode_in_pieces` cuts the text at safe points
(`cut_points`), encodes the pieces a batch at a time and joins their tokens, adding the post-processor's special
tokens (e.g. BOS) once around the whole, as tokenizing it whole would.
"""

from __future__ import annotations

import re

import numpy as np
from tokenizers import Tokenizer

PIECE_CHARS = 1 << 18  # a text longer than this is tokenized in pieces of about this many characters
CUT_POINT = re.compile(r"(?<=\n)(?=\S)|(?<=\S)(?= )")  # where a piece may end: after a newline, before a space
CUT_CONTEXT = 1024  # characters either side of a cut whose tokens must be the same cut and uncut
CUT_TRIES = 64  # cut points tried at each piece's end before the text is left whole


def encode_in_pieces(
    tokenizer: Tokenizer, text: str, add_special_tokens: bool, dtype: np.dtype, batch_chars: int
) -> np.ndarray | None:
    """The token ids of `text`, tokenized in pieces, `batch_chars` characters at a time; None for a text of at most
    `PIECE_CHARS` or one that cannot be cut safely (the caller then encodes it whole)."""
    if len(text) <= PIECE_CHARS:
        return None
    if tokenizer.truncation is not None or tokenizer.padding is not None:
        return None  # they apply to each text encoded: pieces would differ from the whole
    cuts = cut_points(tokenizer, text)
    ends = special_ends(tokenizer, text) if add_special_tokens else ([], [])
    if cuts is None or ends is None:
        return None
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # no offsets: less memory
    arrays = [np.asarray(ends[0], dtype=dtype)]
    bounds = [0, *cuts, len(text)]
    pieces: list[str] = []
    for start, end in zip(bounds, bounds[1:]):
        pieces.append(text[start:end])
        if end == len(text) or sum(map(len, pieces)) >= batch_chars:
            arrays.extend(np.asarray(e.ids, dtype=dtype) for e in encode(pieces, add_special_tokens=False))
            pieces.clear()
    arrays.append(np.asarray(ends[1], dtype=dtype))
    return np.concatenate(arrays)


def cut_points(tokenizer: Tokenizer, text: str) -> list[int] | None:
    """Where to cut `text` into pieces of about `PIECE_CHARS` whose tokens, joined, are the tokens of the whole.

    A cut goes after a newline or before a space, and only where the tokens of `CUT_CONTEXT` characters either side
    are the same cut and uncut. Merges never cross the words a pre-tokenizer splits off, and byte-level and regex
    pre-tokenizers (GPT-2, Llama 3, ...) end a word there, so a cut that passes this test changes nothing; a cut
    inside a word, or a tokenizer that marks the start of every text it is given (Llama 2's prepended "▁"), fails
    it. None when none of `CUT_TRIES` points at a piece's end passes.
    """

    def tokens(start: int, end: int) -> list[int]:
        return tokenizer.encode(text[max(start, 0) : end], add_special_tokens=False).ids

    cuts = [0]
    while len(text) - cuts[-1] > PIECE_CHARS:
        for tries, match in enumerate(CUT_POINT.finditer(text, cuts[-1] + PIECE_CHARS), 1):
            cut = match.start()
            start, end = cut - CUT_CONTEXT, cut + CUT_CONTEXT
            if tokens(start, end) == tokens(start, cut) + tokens(cut, end):
                cuts.append(cut)
                break
            if tries == CUT_TRIES:
                return None
        else:
            break  # no cut point in the rest: it is the last piece
    return cuts[1:]


def special_ends(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[int]] | None:
    """The ids the post-processor adds before and after a text's own (e.g. BOS), found on the text's beginning;
    None when its output is not the text's tokens with ids around them."""
    probe = text[:CUT_CONTEXT]
    plain = tokenizer.encode(probe, add_special_tokens=False).ids
    full = tokenizer.encode(probe, add_special_tokens=True).ids
    for k in range(len(full) - len(plain) + 1):
        if plain and full[k : k + len(plain)] == plain:
            return full[:k], full[k + len(plain) :]
    return None
