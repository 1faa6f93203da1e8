"""The decoder: a plain-PyTorch transformer (no Lightning) built from one ModelConfig."""

from lit_open.model.attention import causal_attention
from lit_open.model.config import ModelConfig
from lit_open.model.model import Transformer, num_parameters

__all__ = ["ModelConfig", "Transformer", "causal_attention", "num_parameters"]
