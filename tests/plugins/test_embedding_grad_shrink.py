"""The embedding_grad_shrink plugin: same forward, alpha x the embeddings' input-side gradient, also under TP."""

from __future__ import annotations

import pytest
import torch
from conftest import read_metrics, run_gloo, tiny_overrides

from lit_open.compose import load_train_config
from lit_open.config import StrategyConfig
from lit_open.errors import UserError
from lit_open.model import ModelConfig, Transformer
from lit_open.parallel import materialize, parallelize
from lit_open.plugin import build_plugins
from lit_open.plugins.embedding_grad_shrink import EmbeddingGradShrink
from lit_open.train import run
from lit_open.train.events import read_events
from lit_open.train.loss import lm_loss

TINY = dict(vocab_size=100, pad_vocab_multiple=32, n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=48)
ALPHA = 0.1


def tiny_model(tie: bool, plugin: EmbeddingGradShrink | None = None) -> Transformer:
    model = Transformer(ModelConfig(**TINY, max_seq_len=16, tie_embeddings=tie))
    if plugin is not None:
        plugin.on_model_built(model)
    model.init_weights(seed=3)
    return model


def logits_and_grads(model: Transformer, tokens: torch.Tensor, retain_embedding_grad: bool = False):
    """Logits, loss gradients of every parameter, and (optionally) the gradient at the embeddings' output."""
    seen = {}
    if retain_embedding_grad:

        def keep(_module, _args, output):
            output.retain_grad()
            seen["embedded"] = output

        model.tok_embeddings.register_forward_hook(keep)
    hidden = model(tokens[:, :-1], return_hidden=True)  # with grad: the hook is active
    logits = model.output(hidden)
    lm_loss(hidden, model.output, tokens[:, 1:], chunk_tokens=0).loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logits.detach(), grads, seen.get("embedded")


def batch() -> torch.Tensor:
    return torch.randint(0, 100, (3, 17), generator=torch.Generator().manual_seed(0))


def test_untied_forward_unchanged_and_embedding_gradient_scaled_by_alpha():
    tokens = batch()
    base_logits, base, _ = logits_and_grads(tiny_model(tie=False), tokens)
    logits, shrunk, _ = logits_and_grads(tiny_model(tie=False, plugin=EmbeddingGradShrink(alpha=ALPHA)), tokens)
    assert torch.equal(logits, base_logits)  # bit for bit: the forward value is untouched
    assert base["tok_embeddings.weight"].abs().sum() > 0
    # alpha * (g1 + g2) and alpha * g1 + alpha * g2 round differently: an entry summed from cancelling terms may
    # differ relatively more than 1e-5, so the absolute tolerance is a millionth of the gradient's scale
    expected = ALPHA * base["tok_embeddings.weight"]
    torch.testing.assert_close(shrunk["tok_embeddings.weight"], expected, rtol=1e-5, atol=1e-6 * expected.abs().max())
    for name in base:  # nothing else sees the change: the embeddings' output gradient feeds only the table
        if name != "tok_embeddings.weight":
            assert torch.equal(shrunk[name], base[name]), name


def test_tied_only_the_input_side_part_is_shrunk():
    tokens = batch()
    base_logits, base, embedded = logits_and_grads(tiny_model(tie=True), tokens, retain_embedding_grad=True)
    model = tiny_model(tie=True, plugin=EmbeddingGradShrink(alpha=ALPHA))
    assert model.output.weight is model.tok_embeddings.weight
    logits, shrunk, _ = logits_and_grads(model, tokens)
    assert torch.equal(logits, base_logits)
    # by hand: the input-side part of the table's gradient is the embeddings' output gradient summed per token id;
    # the rest of the tied table's gradient comes from the output head
    weight = base["tok_embeddings.weight"]
    input_side = torch.zeros_like(weight).index_add_(0, tokens[:, :-1].flatten(), embedded.grad.flatten(0, 1))
    output_side = weight - input_side
    assert input_side.abs().sum() > 0 and output_side.abs().sum() > 0
    expected = ALPHA * input_side + output_side
    torch.testing.assert_close(shrunk["tok_embeddings.weight"], expected, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(shrunk["tok_embeddings.weight"], ALPHA * weight)  # the output head's part stays


def test_no_gradient_no_hook_work_and_options_are_validated():
    model = tiny_model(tie=False, plugin=EmbeddingGradShrink(alpha=0.5))
    with torch.no_grad():
        out = model.tok_embeddings(batch())
    assert out.grad_fn is None
    cfg = load_train_config(["plugins=[embedding_grad_shrink]", "plugins.embedding_grad_shrink.alpha=0.25"])
    (plugin,) = build_plugins(cfg.plugins)
    assert isinstance(plugin, EmbeddingGradShrink) and plugin.cfg.alpha == 0.25
    assert build_plugins(load_train_config(["plugins=[embedding_grad_shrink]"]).plugins)[0].cfg.alpha == 0.1
    for bad in ("0", "-0.1", "1.5", "nan"):
        cfg = load_train_config(["plugins=[embedding_grad_shrink]", f"plugins.embedding_grad_shrink.alpha={bad}"])
        with pytest.raises(UserError, match=r"plugins\.embedding_grad_shrink\.alpha"):
            build_plugins(cfg.plugins)


def test_training_run_logs_the_event_and_shrinks_the_gradient_norm(tiny_data, tmp_path):
    def train(run_dir, *plugins):
        extra = {"trainer.max_steps": 3, "trainer.validate_at_start": "false", "trainer.val_check_interval": 0}
        return run(load_train_config([*tiny_overrides(tiny_data, run_dir, **extra), *plugins]))

    shrunk = train(tmp_path / "egs", "plugins=[embedding_grad_shrink]", "plugins.embedding_grad_shrink.alpha=0.01")
    plain = train(tmp_path / "plain")
    assert shrunk["steps"] == plain["steps"] == 3
    events = [e for e in read_events(tmp_path / "egs" / "events.jsonl") if e["event"] == "embedding_grad_shrink"]
    assert len(events) == 1 and events[0]["alpha"] == 0.01 and events[0]["plugin"] == "embedding_grad_shrink"
    assert events[0]["step"] == 0 and events[0]["tied_embeddings"] is True  # the quickstart model ties them
    first = {name: read_metrics(tmp_path / name)[0] for name in ("egs", "plain")}
    assert [first[name]["step"] for name in first] == ["1", "1"]
    # step 1: same weights, same batch: the same loss, and a smaller global gradient norm (the embeddings' part shrank)
    assert float(first["egs"]["train/loss"]) == float(first["plain"]["train/loss"])
    assert float(first["egs"]["train/grad_norm"]) < float(first["plain"]["train/grad_norm"])


# -- tensor parallelism: the hook registered before parallelize_module still runs, and gives the same gradients --


def tp_worker() -> None:
    for tie in (False, True):  # both in one pair of processes: starting them is most of the cost
        check_tensor_parallel(tie)


def check_tensor_parallel(tie: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    tokens = batch()
    config = ModelConfig(**TINY, max_seq_len=16, tie_embeddings=tie)
    reference = tiny_model(tie=tie, plugin=EmbeddingGradShrink(alpha=ALPHA))
    _, ref_grads, _ = logits_and_grads(reference, tokens)

    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
    with torch.device("meta"):
        sharded = Transformer(config)
    EmbeddingGradShrink(alpha=ALPHA).on_model_built(sharded)  # as LitLM does: after build, before parallelize
    materialize(parallelize(sharded, StrategyConfig(name="tp"), mesh), torch.device("cpu"), seed=3)
    with torch.no_grad():
        state = reference.state_dict()
        for name, param in sharded.named_parameters():
            param.copy_(distribute_tensor(state[name], param.device_mesh, param.placements))
    hidden = sharded(tokens[:, :-1], return_hidden=True)
    lm_loss(hidden, sharded.output, tokens[:, 1:], chunk_tokens=0).loss.backward()
    for name, param in sharded.named_parameters():
        grad = param.grad.full_tensor()
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-7, msg=f"tie={tie}: {name}")
    _, plain_grads, _ = logits_and_grads(tiny_model(tie=tie), tokens)  # the shrink did happen under TP
    embedding_grad = sharded.tok_embeddings.weight.grad.full_tensor()
    assert not torch.allclose(embedding_grad, plain_grads["tok_embeddings.weight"], rtol=1e-2, atol=0)


@pytest.mark.slow
def test_tensor_parallel_gives_the_shrunk_gradients_of_one_process():
    """2 CPU processes (gloo), tied and untied embeddings: every gradient equals the one-process model's with EGS."""
    run_gloo(tp_worker)
