"""Model FLOPs per trained token, forward and backward: 6*N + 12*L*d*T (Kaplan et al. 2020; PaLM, appendix B).

N = the parameters without the input embedding (a lookup, no matmul), the output head counted; with tied
embeddings the shared matrix is counted once, as the head. L = layers, d = the attention width n_head * head_dim,
T = the sequence length. The 12*L*d*T term is the attention score and value matmuls over the full T x T matrix
(causal masking is not discounted, as in PaLM). Recomputation under activation checkpointing is not counted, so
MFU computed from these FLOPs measures useful model work.
"""

from __future__ import annotations

import torch

from lit_open.model.config import ModelConfig
from lit_open.model.model import Transformer, num_parameters


def non_embedding_parameters(config: ModelConfig) -> int:
    """N of the FLOP formula: all parameters but the input embedding; a tied embedding counts once, as the head."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = Transformer(config)
    n = num_parameters(model)
    return n if config.tie_embeddings else n - model.tok_embeddings.weight.numel()


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token, forward and backward: 6*N + 12*L*d*T (see the module docstring)."""
    d = config.n_head * config.head_dim
    return 6 * non_embedding_parameters(config) + 12 * config.n_layer * d * seq_len
