"""Text generation with the in-memory model: greedy or sampled, a batch of prompts at a time.

One forward over the whole (growing) sequences per new token, without a KV cache: generation here serves
monitoring (the `samples` plugin) and benchmarks (lm-eval's generate_until), a few dozen tokens from short
prompts, and the same code then runs on a model sharded with FSDP2 or tensor parallelism. Under those, every rank
must call `generate` with the same prompts and settings (and, when sampling, a generator seeded alike): the ranks
then compute the same logits, draw the same tokens and stop together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.distributed.tensor import DTensor

from lit_open.model import Transformer


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    stop_ids: Sequence[int] = (),
    stop: Callable[[list[int]], bool] | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt (the prompt itself excluded).

    temperature 0 picks the most likely token (greedy); above 0 samples from softmax(logits / temperature),
    restricted to the `top_k` most likely tokens when given, drawing with `generator` (on the model's device).
    A row ends after `max_new_tokens`, at a token in `stop_ids` (not included in its output) or once
    `stop(new_tokens)` is true (e.g. a stop string appeared in the decoded text). Prompts longer than the model's
    context keep their last `max_seq_len` tokens (under tensor parallelism: rounded down to a multiple of its degree,
    as every forward's width is padded to one). The caller chooses train/eval mode (use eval: no dropout).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the tokenizer's BOS or EOS id)")
    device = next(model.parameters()).device
    multiple = _sequence_multiple(model)
    # the widest window that is a multiple too, so that padding a full window never exceeds the model's context
    context, vocab = model.config.max_seq_len - model.config.max_seq_len % multiple, model.config.vocab_size
    rows = [list(p) for p in prompts]
    new: list[list[int]] = [[] for _ in rows]
    done = [max_new_tokens <= 0] * len(rows)
    stop_set = set(stop_ids)
    while not all(done):
        windows = [row[-context:] for row in rows]
        width = -(-max(map(len, windows)) // multiple) * multiple
        # right padding: attention is causal, so a row's last real position never sees the padding after it
        input_ids = torch.zeros(len(windows), width, dtype=torch.long)
        for i, window in enumerate(windows):
            input_ids[i, : len(window)] = torch.tensor(window)
        logits = model(input_ids.to(device))
        last = torch.tensor([len(w) - 1 for w in windows], device=logits.device)
        next_logits = logits[torch.arange(len(windows), device=logits.device), last, :vocab].float()
        tokens = _pick(next_logits, temperature, top_k, generator).tolist()
        for i, token in enumerate(tokens):
            if done[i]:
                continue
            if token in stop_set:
                done[i] = True
                continue
            rows[i].append(token)
            new[i].append(token)
            done[i] = len(new[i]) >= max_new_tokens or (stop is not None and stop(new[i]))
    return new


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None):
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


def _sequence_multiple(model: Transformer) -> int:
    """What the sequence length must be a multiple of: the tensor-parallel degree (sequence parallelism splits the
    sequence evenly across the tensor-parallel ranks), else 1."""
    for param in model.parameters():
        if isinstance(param, DTensor) and "tensor_parallel" in (param.device_mesh.mesh_dim_names or ()):
            return param.device_mesh["tensor_parallel"].size()
    return 1
