"""Context parallelism (lit_open.context_parallel) against the whole sequence on one process: the zig-zag split,
attention from a shard's positions against torch's math attention, and the model's loss and every gradient on 2
and 4 gloo processes with packed documents that cross the shard boundaries (also under tensor parallelism)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import cli_here, read_metrics, run_cli, run_gloo, tiny_overrides, train_losses

from lit_open.config import StrategyConfig
from lit_open.context_parallel import ContextParallel, shard_sequence, zigzag_positions
from lit_open.model import ModelConfig, Transformer, causal_attention
from lit_open.model.attention import doc_ids_from_tokens
from lit_open.parallel import materialize, parallelize
from lit_open.train.loss import lm_loss

CONFIG = dict(vocab_size=64, pad_vocab_multiple=32, n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=48)
EOS = 3


def test_zigzag_split_gives_each_rank_an_early_and_a_late_chunk():
    assert zigzag_positions(4, 0, 2).tolist() == [0, 1, 6, 7]
    assert zigzag_positions(4, 1, 2).tolist() == [2, 3, 4, 5]
    x = torch.arange(16).view(1, 16)
    shards = [shard_sequence(x, r, 4) for r in range(4)]
    assert [s.tolist()[0] for s in shards] == [zigzag_positions(4, r, 4).tolist() for r in range(4)]
    assert sorted(torch.cat(shards, dim=1).flatten().tolist()) == list(range(16))


@pytest.mark.parametrize("backend", ["dense", "math", "sdpa", "auto"])
@pytest.mark.parametrize("documents", [False, True])
def test_queries_at_positions_see_what_they_see_in_the_whole_sequence(backend, documents):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 24, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    doc_ids = torch.tensor([[0] * 5 + [1] * 11 + [2] * 8, [0] * 24]) if documents else None
    positions = zigzag_positions(8, 1, 3)  # rows 4-7 and 16-19: documents cross both chunk boundaries
    # the reference: torch's own math kernel on the whole sequence, with an explicit causal + document mask
    mask = torch.ones(24, 24, dtype=torch.bool).tril()
    if documents:
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    out = causal_attention(q[:, :, positions], k, v, backend, doc_ids, q_positions=positions)
    torch.testing.assert_close(out, expected[:, :, positions], rtol=1e-5, atol=1e-6)  # math computes in float32


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "auto"])
def test_compiled_flex_attention_from_positions_matches_the_math_reference_on_cuda(backend):
    """The GPU path of context parallelism: bf16 forward and backward against float32 math on the same shard."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, h, 1024, 64, generator=g, device="cuda") for h in (8, 2, 2))
    doc_ids = (torch.arange(1024, device="cuda") // 300).expand(2, -1).contiguous()
    positions = zigzag_positions(256, 1, 4, device="cuda")
    inputs = [t.bfloat16().requires_grad_() for t in (q[:, :, positions], k, v)]
    out = causal_attention(*inputs, backend, doc_ids, q_positions=positions)
    out.float().square().sum().backward()
    reference = [t.clone().requires_grad_() for t in (q[:, :, positions], k, v)]
    expected = causal_attention(*reference, "math", doc_ids, q_positions=positions)
    expected.square().sum().backward()
    for got, want in [(out, expected), *((a.grad, b.grad) for a, b in zip(inputs, reference))]:
        assert float((got.float() - want).norm() / want.norm()) < 2e-2  # bf16 rounding, not a wrong mask


def test_kernels_that_attend_within_one_sequence_refuse_a_shard():
    q = torch.randn(1, 2, 4, 8)
    k = v = torch.randn(1, 2, 8, 8)
    with pytest.raises(Exception, match="model.attention=varlen cannot attend from a shard"):
        causal_attention(q, k, v, "varlen", q_positions=torch.arange(4))


def _tokens(batch: int, length: int) -> torch.Tensor:
    """Random tokens with an end-of-document every few tokens, so documents straddle every shard boundary."""
    tokens = torch.randint(4, 64, (batch, length + 1), generator=torch.Generator().manual_seed(1))
    tokens[:, 5::7] = EOS
    return tokens


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        grads[name.replace("_checkpoint_wrapped_module.", "")] = grad
    return grads


def cp_worker(tensor_parallel: int, checkpointing: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    cp = world // tensor_parallel
    config = ModelConfig(**CONFIG, max_seq_len=64, attention="dense")
    tokens = _tokens(2, 32)
    doc_ids = doc_ids_from_tokens(tokens[:, :-1], EOS)
    whole = Transformer(config)
    whole.init_weights(seed=5)
    hidden = whole(tokens[:, :-1], doc_ids, return_hidden=True)
    expected = lm_loss(hidden, whole.output, tokens[:, 1:], chunk_tokens=16)
    expected.loss.backward()
    expected_grads = _gradients(whole)

    mesh = init_device_mesh(
        "cpu", (1, cp, tensor_parallel), mesh_dim_names=("data_parallel", "context_parallel", "tensor_parallel")
    )
    context_parallel = ContextParallel(mesh["context_parallel"].get_group())
    with torch.device("meta"):
        model = Transformer(config)
    parallelize(model, StrategyConfig(activation_checkpointing=checkpointing), mesh, context_parallel)
    materialize(model, torch.device("cpu"), seed=5)
    batch = {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:], "doc_ids": doc_ids}
    with context_parallel.sharded(batch) as local:
        hidden = model(local["input_ids"], local["doc_ids"], return_hidden=True, positions=local["positions"])
        out = context_parallel.whole_sequence_loss(lm_loss(hidden, model.output, local["targets"], chunk_tokens=16))
        out.loss.backward()
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=0)
    assert int(out.tokens) == expected.tokens.item()
    grads = _gradients(model)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():  # FSDP2 averaged over the context-parallel ranks: the whole batch's gradient
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # outside `sharded`, the same model attends over whole sequences: in-loop evaluation needs nothing else
    logits = model(tokens[:, :-1], doc_ids)
    torch.testing.assert_close(logits, whole(tokens[:, :-1], doc_ids), rtol=1e-5, atol=1e-5)


def test_context_parallel_loss_and_gradients_equal_one_process():
    """2 processes, blocks recomputed in the backward pass (attention gathers again there); the runs below cover
    4 processes, data and tensor parallelism."""
    run_gloo(cp_worker, 1, "full", nprocs=2)


# -- bad input: refused at start-up with exit 2 and the values named ---------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"data.seq_len": 60, "strategy.context_parallel_size": 4},
            "data.seq_len=60 is not divisible by 2 x strategy.context_parallel_size=4 = 8",
        ),
        (
            {"model.attention": "flash_attn", "strategy.context_parallel_size": 2},
            "model.attention=flash_attn cannot serve strategy.context_parallel_size=2",
        ),
        (
            {"model.attention": "varlen", "strategy.context_parallel_size": 2},
            "model.attention=varlen cannot serve strategy.context_parallel_size=2",
        ),
        (
            {"strategy.context_parallel_size": 3, "trainer.devices": 4, "data.seq_len": 48},
            "data_parallel_size=1 x context_parallel_size=3 x tensor_parallel_size=1 = 3 processes, but the run has 4",
        ),
        (
            {"strategy.context_parallel_size": 2, "strategy.tensor_parallel_size": 2, "strategy.data_parallel_size": 2},
            "= 8 processes, but the run has 2",
        ),
        (
            {"strategy": "ddp", "strategy.context_parallel_size": 2},
            "strategy.context_parallel_size applies to strategy=fsdp, tp or fsdp_tp, not strategy=ddp",
        ),
    ],
)
def test_bad_context_parallel_settings_exit_2_naming_the_values(short_documents, tmp_path, overrides, message):
    settings = {"strategy": "fsdp", "data.seq_len": 64, "trainer.devices": 2, **overrides}
    result = cli_here("train", *tiny_overrides(short_documents, tmp_path / "run", model="quickstart", **settings))
    assert result.returncode == 2, result.stderr
    assert message in " ".join(result.stderr.split()), result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- `lit-open train` as a user types it ------------------------------------------------------------------------

STEPS = 10
SETUPS = {  # name -> (processes, strategy overrides)
    "single": (1, {"strategy": "fsdp"}),
    "cp2": (2, {"strategy": "fsdp", "strategy.context_parallel_size": 2}),
    "dp2_cp2": (
        4,
        {"strategy": "fsdp", "strategy.context_parallel_size": 2, "strategy.activation_checkpointing": "full"},
    ),
    "tp2_cp2": (
        4,
        {
            "strategy": "fsdp_tp",
            "strategy.tensor_parallel_size": 2,
            "strategy.context_parallel_size": 2,
            "strategy.activation_checkpointing": "selective",
        },
    ),
}


@pytest.fixture(scope="module")
def short_documents(tiny_data, tmp_path_factory) -> Path:
    """400 documents of about 10-40 tokens, so that 64-token rows pack several and they cross every shard boundary
    (tokenized with the session's tiny BPE: no tokenizer to train)."""
    from lit_open.config import PrepareConfig
    from lit_open.data.prepare import prepare

    root = tmp_path_factory.mktemp("short-documents")
    corpus = root / "corpus"
    corpus.mkdir()
    words = Path(torch.__file__).read_text().split()
    for i in range(400):
        (corpus / f"{i:03d}.txt").write_text(" ".join(words[i * 7 : i * 7 + 3 + i % 8]))
    prepare(
        PrepareConfig(
            inputs=[str(corpus)],
            output=str(root / "prepared"),
            tokenizer=str(tiny_data / "tokenizer.json"),
            val_fraction=0.1,
            num_workers=1,
        )
    )
    manifest = json.loads((root / "prepared" / "train" / "manifest.json").read_text())
    assert manifest["tokens"] / manifest["documents"] < 40  # every 64-token row holds parts of several documents
    return root / "prepared"


def train(data: Path, run_dir: Path, processes: int, **overrides: object) -> None:
    settings = {
        "data.seq_len": 64,
        "data.document_mask": "true",
        "trainer.max_steps": STEPS,
        "trainer.val_check_interval": 0,
        "trainer.devices": processes,
        "checkpoint.every_n_steps": 5,
        "checkpoint.keep_last": 0,
        "model.attention": "dense",
        "data.val_sources": "[]",
        **({} if "plugins" in overrides else {"plugins": "[z_loss,monitor]", "plugins.monitor.every_n_steps": 5}),
        **overrides,
    }
    result = run_cli("train", *tiny_overrides(data, run_dir, model="quickstart", **settings), timeout=300)
    assert result.returncode == 0, f"{run_dir.name}: {result.stderr[-4000:]}"


@pytest.fixture(scope="module")
def cp_runs(short_documents, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cp-runs")
    for name, (processes, overrides) in SETUPS.items():
        train(short_documents, root / name, processes, **overrides)
    return {name: root / name for name in SETUPS}


def assert_same_losses(losses: dict[int, float], reference: dict[int, float]) -> None:
    assert sorted(losses) == sorted(reference)
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], rel=1e-5), (step, loss, reference[step])


def column(run_dir: Path, key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in read_metrics(run_dir) if r.get(key)}


# z-loss (a loss term over every token's logsumexp) and the monitor's statistics, summed over shards and ranks. Their
# tolerance: the float rounding of other reduction orders grows through 10 steps at LR 1e-2 (the activations' RMS
# under TP x CP drifts 1.6e-4 by step 5 while the loss stays within 1e-5); a shard counted twice or not at all is
# off by percents.
PLUGIN_COLUMNS = ("train/z_loss", "monitor/grad_norm", "monitor/param_norm", "monitor/act_rms/layers.3")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cp2", "dp2_cp2", "tp2_cp2"])
def test_context_parallel_runs_train_like_one_process(cp_runs, name):
    reference = train_losses(cp_runs["single"])
    assert len(reference) == STEPS and reference[STEPS] < reference[1] - 0.5  # it learns
    assert_same_losses(train_losses(cp_runs[name]), reference)
    for key in PLUGIN_COLUMNS:
        expected = column(cp_runs["single"], key)
        assert len(expected) >= 2, key
        values = column(cp_runs[name], key)
        assert values.keys() == expected.keys(), key
        for step, value in values.items():
            assert value == pytest.approx(expected[step], rel=5e-4), (key, step, value, expected[step])


@pytest.mark.slow
@pytest.mark.parametrize("context_parallel", [1, 4])
def test_a_context_parallel_checkpoint_resumes_with_another_context_parallel_size(
    cp_runs, short_documents, tmp_path, context_parallel
):
    """The step-5 checkpoint of cp=2 resumes on cp=1 and cp=4: step 6 repeats the cp=2 run's loss."""
    checkpoint = cp_runs["cp2"] / "checkpoints" / "step-00000005.ckpt"
    run_dir = tmp_path / f"cp{context_parallel}"
    overrides = {"strategy": "fsdp", "strategy.context_parallel_size": context_parallel, "trainer.max_steps": 6}
    train(short_documents, run_dir, context_parallel, resume=str(checkpoint), **overrides)
    assert train_losses(run_dir)[6] == pytest.approx(train_losses(cp_runs["cp2"])[6], rel=1e-5)


@pytest.mark.slow
def test_a_long_context_stage_starts_from_a_checkpoint_under_context_parallelism(cp_runs, short_documents, tmp_path):
    """init_from the single run's last checkpoint with twice the sequence and another RoPE theta (a long-context
    stage), on 2 context-parallel processes: it trains from the trained weights with the stage's settings."""
    stage = {
        "init_from": str(cp_runs["single"] / "checkpoints" / "step-00000010.ckpt"),
        "data.seq_len": 128,
        "data.global_batch_size": 4,
        "data.micro_batch_size": 2,
        "model.rope_theta": 40000.0,
        "trainer.max_steps": 2,
        "plugins": "[]",
        "strategy.context_parallel_size": 2,
    }
    train(short_documents, tmp_path / "stage", 2, strategy="fsdp", **stage)
    losses = train_losses(tmp_path / "stage")
    assert sorted(losses) == [1, 2] and losses[1] < train_losses(cp_runs["single"])[1] - 0.5  # not a fresh model
    config = (tmp_path / "stage" / "config.yaml").read_text()
    assert "rope_theta: 40000.0" in config and "seq_len: 128" in config and "context_parallel_size: 2" in config
    events = [json.loads(line) for line in (tmp_path / "stage" / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "init_from" and e["source_step"] == 10 for e in events)
