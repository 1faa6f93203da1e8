"""The dtype names that configs, commands and the Python API accept, and the torch dtype each stands for."""

from __future__ import annotations

import torch

from lit_open.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(dtype: torch.dtype | str | None, key: str = "dtype", none: str = "") -> torch.dtype | None:
    """The torch dtype a name stands for (a torch.dtype and None pass through); UserError naming `key` otherwise.

    none: what None means where `key` accepts it, for the message (e.g. "the dtype the model trains in").
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    also = f", or null ({none})" if none else ""
    raise UserError(f"{key}={dtype!r} is not supported; choose one of: {', '.join(DTYPES)}{also}.")
