"""Tensor + sequence parallelism of every layout on 2 CPU processes (gloo) against the same model on one process.

The TP plans of lit_open.parallel touch each family's peculiarities: OLMo 2's post-norms and full-width QK-norm
(a norm over all heads, split across ranks), per-head QK-norm, GPT-NeoX's parallel residual, LayerNorm biases,
GELU MLP and partial rotary, and tied embeddings. Loss and every parameter's gradient must match.
"""

from __future__ import annotations

import pytest
import torch
from conftest import run_gloo

from lit_open.config import StrategyConfig
from lit_open.model import ModelConfig, Transformer
from lit_open.parallel import materialize, parallelize
from lit_open.train.loss import lm_loss

pytestmark = pytest.mark.slow

BASE = dict(vocab_size=100, pad_vocab_multiple=32, n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=48)
LAYOUTS = {
    "olmo2": dict(family="olmo2", norm_placement="post", qk_norm="full"),
    "llama_head_qk_norm_tied": dict(qk_norm="head", tie_embeddings=True),
    "pythia": dict(
        family="gpt_neox",
        norm="layernorm",
        parallel_residual=True,
        mlp="gelu",
        bias=True,
        rotary_fraction=0.25,
        n_kv_head=4,
    ),
}


def loss_and_grads(model: Transformer, tokens: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    hidden = model(tokens[:, :-1], return_hidden=True)
    loss = lm_loss(hidden, model.output, tokens[:, 1:], chunk_tokens=10).loss
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        grads[name] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    return loss.item(), grads


def worker(layout: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    config = ModelConfig(**{**BASE, **LAYOUTS[layout]}, max_seq_len=16)
    tokens = torch.randint(0, 100, (3, 17), generator=torch.Generator().manual_seed(0))
    whole = Transformer(config)
    whole.init_weights(seed=3)
    with torch.no_grad():  # non-trivial norm weights and biases, so that their sharding matters
        for name, param in whole.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    ref_loss, ref_grads = loss_and_grads(whole, tokens)

    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
    with torch.device("meta"):
        sharded = Transformer(config)
    materialize(parallelize(sharded, StrategyConfig(name="tp"), mesh), torch.device("cpu"), seed=3)
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        reference_state = whole.state_dict()
        for name, param in sharded.named_parameters():
            param.copy_(distribute_tensor(reference_state[name], param.device_mesh, param.placements))
    if config.tie_embeddings:
        assert sharded.output.weight is sharded.tok_embeddings.weight
    loss, grads = loss_and_grads(sharded, tokens)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (layout, loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=f"{layout}: {name}")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_tensor_parallel_matches_one_process(layout):
    run_gloo(worker, layout)
