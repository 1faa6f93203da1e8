"""The `olmo_core` runner of the throughput benchmark: OLMo-core's `Transformer` with the same sizes and layout.

OLMo-core (PyPI `ai2-olmo-core`, import `olmo_core`, github.com/allenai/OLMo-core) is AI2's trainer of OLMo 2. This
runner builds its model from a `TransformerConfig` mapped from lit-open's `ModelConfig` (`olmo_core_config`), the
way `TransformerConfig.llama_like` and `TransformerConfig.olmo2_1B_v2` build it (olmo_core/nn/transformer/config.py
of ai2-olmo-core 3.0.0): on the meta device, then `Transformer.init_weights` (olmo_core/nn/transformer/model.py)
materialises it on the bench device with OLMo-core's own initialisation, `InitMethod.normal`
(olmo_core/nn/transformer/init.py): every linear and embedding weight ~ N(0, init_std) truncated at 3 std, biases
zero, norms one, from one generator seeded with `run.seed`. The switches are OLMo-core's own methods of its model,
in the order of `parallelize_model` (olmo_core/train/train_module/transformer/common.py): `apply_fp8` (torchao
float8, the LM head excluded), `apply_activation_checkpointing` (`full`; lit-open's `selective` -> OLMo-core's
`selected_ops`, whose policy keeps the attention outputs and every other matmul's), `apply_compile` (each block and
the LM head) and `apply_fsdp` (FSDP2: blocks, embeddings, LM head, root). OLMo-core initialises after all of them;
here `init_weights` comes first, which on one device gives the same values.
The optimizer, LR schedule, clipping and the loss are lit-open's (`runners._train_loop`): lit-open's chunked loss
applies the output projection itself, so the LM head keeps its final norm and its projection `w_out` becomes a
`ChunkedLossHead` that computes lit-open's loss from the final-normed hidden states (the model returns the loss:
under OLMo-core's FSDP2 layout the projection is only gathered inside the model's forward).

What OLMo-core cannot express (`olmo_core_unavailable(config)` says so, `olmo_core_config` raises UserError): a
plain GELU MLP (its FeedForward is always gated: w1, w2, w3) and the parallel residual of GPT-NeoX/Pythia. Not
mapped: `init_cutoff` (always 3 std there), `init_scale_output` (InitMethod.normal does not scale output
projections), `max_seq_len` (RoPE is computed for the sequences given). `attention=flash_attn` -> OLMo-core's
`flash_2` backend, any other -> `torch` (scaled_dot_product_attention), OLMo-core's default.

ai2-olmo-core 3.0.0 requires torch>=2.10,<2.14; it imports and trains on torch 2.14 all the same. Installing it
takes `pip install --no-deps ai2-olmo-core dataclass-extensions bettermap dill` (what importing its model needs
besides torch, numpy, pyyaml, requests, rich, packaging); its `cached_path` dependency pulls in boto3 and
google-cloud-storage for remote files, which a model never touches: when `cached_path` does not import, a stand-in
that raises on use takes its place (`_stand_in_for_cached_path`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
import types
from dataclasses import replace
from typing import Any

import torch

from lit_open.bench.runners import _single_device_mesh, _train_loop
from lit_open.bench.turns import RunnerClock
from lit_open.config import TrainConfig
from lit_open.dtypes import DTYPES
from lit_open.errors import UserError
from lit_open.model import ModelConfig
from lit_open.train.loss import lm_loss

DISTRIBUTION = "ai2-olmo-core"
INSTALL = "pip install --no-deps ai2-olmo-core dataclass-extensions bettermap dill"
# lit-open's activation_checkpointing -> OLMo-core's TransformerActivationCheckpointingMode
AC_MODES = {"full": "full", "selective": "selected_ops"}


def _stand_in_for_cached_path() -> None:
    """Put a stand-in for `cached_path` in sys.modules when it does not import.

    OLMo-core imports `cached_path` (olmo_core/config.py, olmo_core/io.py) to fetch configs and checkpoints from
    URLs; cached_path imports boto3 and google-cloud-storage at once (some 20 MB of wheels). Building and training a
    model never calls it. The stand-in has the names OLMo-core imports (`cached_path`, and `S3Client`,
    `SchemeClient`, `add_scheme_client` of `cached_path.schemes`); calling them raises.
    """
    try:
        import cached_path  # noqa: F401  (the real one, when it and its cloud clients are installed)

        return
    except ImportError:
        pass

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "cached_path is not installed (lit-open's OLMo-core runner stands in for it): OLMo-core cannot fetch "
            "remote files here"
        )

    class SchemeClient:  # the base class OLMo-core's io module subclasses
        recoverable_errors: tuple[type[BaseException], ...] = ()

    class S3Client(SchemeClient):
        pass

    root = types.ModuleType("cached_path", "stand-in (lit_open.bench.olmo_core): remote files unavailable")
    schemes = types.ModuleType("cached_path.schemes")
    root.cached_path = unavailable
    schemes.SchemeClient, schemes.S3Client, schemes.add_scheme_client = SchemeClient, S3Client, unavailable
    root.schemes = schemes
    sys.modules["cached_path"], sys.modules["cached_path.schemes"] = root, schemes


def _import_olmo_core() -> types.ModuleType:
    """`olmo_core.nn.transformer`, imported once."""
    # Importing olmo_core points TRITON_CACHE_DIR, for the whole process, at a per-rank folder under /tmp unless
    # this is set; the other runners of the same process keep Triton's usual cache.
    os.environ.setdefault("OLMO_DISABLE_PER_RANK_TRITON_CACHE", "1")
    # its import warns that transformer_engine (NVIDIA's fused kernels, an alternative attention backend) is absent
    logging.getLogger("olmo_core.nn.attention.te_attn_api").setLevel(logging.ERROR)
    _stand_in_for_cached_path()
    import olmo_core.nn.transformer  # optional: the benchmark skips this runner when it does not import

    return olmo_core.nn.transformer


def _torch_requirement() -> str:
    """The torch requirement of the installed ai2-olmo-core, e.g. `torch<2.14,>=2.10.0`."""
    try:
        requires = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return "an unknown torch pin"
    pins = [r.split(";")[0].strip() for r in requires if r.startswith("torch") and "extra ==" not in r]
    return pins[0] if pins else "no torch pin"


def _version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def olmo_core_unavailable(config: ModelConfig | None = None) -> str | None:
    """Why the olmo_core runner cannot run here (or cannot express `config`'s layout), or None when it can."""
    try:
        _import_olmo_core()
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] == "olmo_core":
            return f"OLMo-core is not installed ({INSTALL}: see docs/benchmarks.md)"
        return f"OLMo-core {_version()} does not import: it needs the module {err.name!r}, not installed ({INSTALL})"
    except Exception as err:  # broken against this torch
        return (
            f"OLMo-core {_version()} does not import with torch {torch.__version__} (it requires "
            f"{_torch_requirement()}): {type(err).__name__}: {err}"
        )
    if config is not None:
        return _unexpressible(config)
    return None


def _unexpressible(config: ModelConfig) -> str | None:
    if config.mlp != "swiglu":
        return (
            f"OLMo-core cannot express model.mlp={config.mlp} ({config.name}): its FeedForward is always gated "
            "(w1, w2, w3)"
        )
    if config.parallel_residual:
        return f"OLMo-core cannot express model.parallel_residual=true ({config.name}): no block type has it"
    return None


def olmo_core_config(config: ModelConfig):
    """An OLMo-core `TransformerConfig` with the sizes and layout of `config`, built as `TransformerConfig.llama_like`
    builds OLMo-core's own presets (`olmo2_1B_v2` is lit-open's `olmo2_1b`): pre-norm -> block `default`, post-norm
    (OLMo 2) -> `reordered_norm`; QK-norm `full` -> RMSNorm over all heads, `head` -> one RMSNorm per head
    (`use_head_qk_norm`); the padded vocabulary; `rope_theta`, `rotary_fraction` -> `partial_rotary_factor`;
    `d_ff` as the FeedForward's hidden size; biases in the attention and MLP projections, none in the head;
    `init_std`; float32 parameters. A layout it cannot express raises UserError."""
    # optional, as in _import_olmo_core (which has put the cached_path stand-in in place first)
    from olmo_core.nn.attention import AttentionBackendName
    from olmo_core.nn.feed_forward import FeedForwardConfig
    from olmo_core.nn.layer_norm import LayerNormConfig, LayerNormType
    from olmo_core.nn.transformer import InitMethod, TransformerBlockType, TransformerConfig

    if why := _unexpressible(config):
        raise UserError(f"{why}; run the benchmark without the olmo_core runner for this model.")
    layernorm = config.norm == "layernorm"
    norm = LayerNormConfig(
        name=LayerNormType.default if layernorm else LayerNormType.rms, eps=config.norm_eps, bias=layernorm
    )
    theta = config.rope_theta
    oc = TransformerConfig.llama_like(
        d_model=config.d_model,
        vocab_size=config.padded_vocab_size,
        n_layers=config.n_layer,
        n_heads=config.n_head,
        n_kv_heads=config.n_kv_head,
        head_dim=config.head_dim,
        qk_norm=config.qk_norm != "none",
        use_head_qk_norm=config.qk_norm == "head",
        layer_norm_eps=config.norm_eps,
        rope_theta=int(theta) if float(theta).is_integer() else theta,
        feed_forward=FeedForwardConfig(hidden_size=config.d_ff, bias=config.bias),
        attn_backend=AttentionBackendName.flash_2 if config.attention == "flash_attn" else AttentionBackendName.torch,
        block_name=TransformerBlockType.reordered_norm
        if config.norm_placement == "post"
        else TransformerBlockType.default,
        tie_word_embeddings=config.tie_embeddings,
        init_method=InitMethod.normal,
        init_std=config.init_std,
    )
    block = oc.block
    attention = block.sequence_mixer
    attention.bias = config.bias
    attention.rope.partial_rotary_factor = config.rotary_fraction
    if attention.qk_norm is not None:  # lit-open's QK-norm is an RMSNorm whatever model.norm says
        attention.qk_norm = replace(norm, name=LayerNormType.rms, bias=False)
    block.layer_norm = norm
    oc.lm_head.layer_norm = norm
    return oc


class ChunkedLossHead(torch.nn.Module):
    """Stands in for the LM head's output projection `w_out`: lit-open's chunked loss (`lm_loss`) of the final-normed
    hidden states through that projection, against the `targets` set before the forward; the model returns the loss.

    The loss is computed inside the model's forward because that is where FSDP2 holds the projection's weight
    gathered: OLMo-core's `apply_fsdp` reshards the root module (which holds the weight when it is tied to the
    embeddings) right after the root's forward."""

    def __init__(self, projection: torch.nn.Linear, chunk_tokens: int) -> None:
        super().__init__()
        self.projection, self.chunk_tokens = projection, chunk_tokens
        self.targets: torch.Tensor | None = None

    @torch.compiler.disable  # OLMo-core's apply_compile compiles the LM head: its norm, not lit-open's loss
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        targets, self.targets = self.targets, None
        if targets is None:
            raise RuntimeError("set ChunkedLossHead.targets before each forward (olmo_core_loss does)")
        return lm_loss(hidden, self.projection, targets, self.chunk_tokens).loss


def build_olmo_core_model(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """OLMo-core's Transformer for `cfg.model` on `device`, initialised by OLMo-core (seed `run.seed`), in the
    precision's dtype, float8 applied where asked; the LM head's output projection then computes lit-open's loss
    (`ChunkedLossHead`, called through `olmo_core_loss`)."""
    oc_config = olmo_core_config(cfg.model)
    oc_config.init_seed = cfg.run.seed
    model = oc_config.build(init_device="meta")
    model.init_weights(max_seq_len=cfg.data.seq_len, device=device)
    if cfg.trainer.precision == "bf16-true":
        model = model.to(torch.bfloat16)
    if cfg.strategy.float8 != "none":  # before w_out is replaced: OLMo-core excludes `lm_head.w_out` by name
        model.apply_fp8(_float8_config(cfg))
    # after init_weights, which ties w_out to the embeddings again when they are tied
    model.lm_head.w_out = ChunkedLossHead(model.lm_head.w_out, cfg.strategy.loss_chunk_tokens)
    return model


def olmo_core_loss(model: torch.nn.Module, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy of a model from `build_olmo_core_model` (lit-open's chunked loss)."""
    model.lm_head.w_out.targets = targets
    return model(input_ids)


def _float8_config(cfg: TrainConfig):
    """OLMo-core's Float8Config for lit-open's strategy.float8, as lit_open.parallel.convert_to_float8 sets torchao."""
    # optional, as in olmo_core_config
    from olmo_core.float8 import AOFloat8LinearConfig, AOFloat8LinearRecipe, Float8Config

    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)):
        raise UserError(
            f"strategy.float8={cfg.strategy.float8} needs an NVIDIA GPU with float8 tensor cores (compute "
            "capability 8.9+); use strategy.float8=none here."
        )
    if cfg.strategy.float8 == "tensorwise" and cfg.strategy.name == "fsdp":
        return Float8Config(ao=AOFloat8LinearConfig(enable_fsdp_float8_all_gather=True))
    return Float8Config(ao_recipe=AOFloat8LinearRecipe(cfg.strategy.float8))


def run_olmo_core(cfg: TrainConfig, clock: RunnerClock) -> None:
    """OLMo-core's Transformer with the same sizes, lit-open's optimizer and loss, and OLMo-core's own
    float8 / activation-checkpointing / compile / FSDP2 methods for the same switches."""
    # optional, as in olmo_core_config
    from olmo_core.nn.transformer import TransformerActivationCheckpointingMode

    model = build_olmo_core_model(cfg, clock.device)
    strategy = cfg.strategy
    if strategy.activation_checkpointing != "none":
        model.apply_activation_checkpointing(
            TransformerActivationCheckpointingMode(AC_MODES[strategy.activation_checkpointing])
        )
    if strategy.compile:
        model.apply_compile()
    if strategy.name == "fsdp":
        model.apply_fsdp(
            dp_mesh=_single_device_mesh(clock.device)["data_parallel"],
            param_dtype=DTYPES[strategy.param_dtype] if strategy.param_dtype else None,
            reduce_dtype=DTYPES[strategy.reduce_dtype],
        )

    def loss_fn(batch: dict[str, Any]) -> torch.Tensor:
        return olmo_core_loss(model, batch["input_ids"], batch["targets"])

    _train_loop(cfg, clock, model, loss_fn, model.post_optim_step)
