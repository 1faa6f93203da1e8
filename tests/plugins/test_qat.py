"""The qat plugin: off it is the float model, on it computes what the quantized model computes; QAT fine-tuning
loses less held-out loss to int4 quantization than quantizing after plain fine-tuning; the export reloads; resume,
options and refused strategies."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL, Crash, CrashAfterStep, bind_run, read_metrics, run_cli, tiny_overrides, train_losses

from lit_open.compose import load_train_config
from lit_open.config import SourceConfig
from lit_open.data.datamodule import TokenSamples, open_sources
from lit_open.errors import UserError
from lit_open.model import ModelConfig, Transformer
from lit_open.parallel import materialize
from lit_open.plugin import build_plugins
from lit_open.plugins.qat import QAT, load_quantized, quantize, quantized_layer_names, write_export
from lit_open.train import run
from lit_open.train.events import read_events
from lit_open.train.runner import parallel_sizes

MODEL = ModelConfig(**{key.removeprefix("model."): value for key, value in TINY_MODEL.items()})
TIED = ModelConfig(**{**vars(MODEL), "tie_embeddings": True})
BLOCK_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
                 "feed_forward.w3")  # fmt: skip
PRETRAIN_STEPS = 400
FAST = {"trainer.validate_at_start": "false", "trainer.val_check_interval": 0, "logger.tensorboard": "false"}


def built(plugin: QAT | None, config: ModelConfig = MODEL) -> Transformer:
    """The model as LitLM builds it: on the meta device, the plugin's hook, then materialised (seed 0)."""
    with torch.device("meta"):
        model = Transformer(config)
    if plugin is not None:
        plugin.on_model_built(model)
    return materialize(model, torch.device("cpu"), seed=0)


def tokens(n: int = 2) -> torch.Tensor:
    return torch.randint(0, MODEL.vocab_size, (n, 32), generator=torch.Generator().manual_seed(0))


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items()}


def float_model(weights: dict[str, torch.Tensor]) -> Transformer:
    model = Transformer(MODEL)
    model.load_state_dict(weights)
    return model.eval()


def held_out_loss(model: Transformer, data: Path, samples: int = 128) -> float:
    """Mean next-token loss over the first `samples` sequences of 33 tokens of the held-out split."""
    dataset = TokenSamples(open_sources([SourceConfig(str(data / "val"))], 33, "val"), block_size=33)
    batch = torch.stack([dataset[(0, i, 0, 0, 1)]["tokens"] for i in range(samples)])
    with torch.no_grad():
        logits = model(batch[:, :-1])
    return float(F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten()))


# -- the model: float when off, the quantized model's numerics when on, unchanged parameter names --------------


@pytest.mark.parametrize("scheme", ["int8_dynamic_act_int4_weight", "int8_weight_only"])
def test_off_is_the_float_model_on_is_the_quantized_model_which_the_export_reloads(scheme, tmp_path):
    plain = built(None)
    plugin = QAT(scheme=scheme)
    model = built(plugin)
    assert list(model.state_dict()) == list(plain.state_dict())  # checkpoints and exports see the float model
    assert sorted(plugin.layers) == sorted(f"layers.{i}.{name}" for i in range(2) for name in BLOCK_LINEARS)
    x = tokens()
    with torch.no_grad():
        reference = plain(x)
        assert torch.equal(model(x), reference)  # off: bit for bit the float forward
        plugin.switch(True)
        fake = model(x)
        real = quantize(plain, scheme, 32, list(plugin.layers))(x)  # torchao PTQ of the same weights
    assert type(plain.layers[0].attention.wq.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert type(plain.output.weight) is torch.nn.Parameter  # excluded: stays float
    torch.testing.assert_close(fake, real, rtol=0, atol=1e-5)  # fake quantization computes what conversion gives
    error = (fake - reference).abs().max().item()
    assert error > (1e-2 if scheme == "int8_dynamic_act_int4_weight" else 1e-4), error  # it does quantize
    metadata = {"scheme": scheme, "group_size": 32, "layers": list(plugin.layers), "model": asdict(MODEL)}
    write_export(plain, tmp_path / "export", metadata)
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "export")(x), real)


def test_gradients_flow_through_fake_quantization():
    plugin = QAT()
    model = built(plugin)
    plugin.switch(True)
    x = tokens()
    F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("scheme", ["int8_dynamic_act_int4_weight", "int8_weight_only"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_in_bf16_off_is_the_float_model_on_is_the_quantized_model_and_gradients_flow(device, scheme, precision):
    """The two tests above in bf16 as trainer.precision runs it (bf16-mixed: float32 weights under bf16 autocast;
    bf16-true: bf16 weights), on the CPU and on a GPU."""
    plain, plugin = built(None).to(device), QAT(scheme=scheme)
    model = built(plugin).to(device)
    if precision == "bf16-true":
        plain.to(torch.bfloat16)
        model.to(torch.bfloat16)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    x = tokens().to(device)
    with torch.no_grad(), autocast:
        reference = plain(x)
        assert torch.equal(model(x), reference)  # off: bit for bit the float forward
        plugin.switch(True)
        fake = model(x)
        real = quantize(plain, scheme, 32, list(plugin.layers))(x)  # torchao PTQ of the same weights
    weight = plain.layers[0].attention.wq.weight
    assert type(weight).__name__ == "IntxUnpackedToInt8Tensor" and weight.device.type == device
    assert reference.dtype == fake.dtype == real.dtype == torch.bfloat16
    # fake quantization computes what conversion gives: equal on the CPU; allowed one bf16 rounding of the logits
    # (eps = 2^-7 of their largest magnitude, about 0.6) in case a GPU kernel rounds an intermediate differently
    torch.testing.assert_close(fake, real, rtol=0, atol=torch.finfo(torch.bfloat16).eps * reference.abs().max().item())
    error = (fake - reference).abs().max().item()  # off is exactly the reference: any difference is quantization
    assert error > (1e-2 if scheme == "int8_dynamic_act_int4_weight" else 1e-4), error
    with autocast:
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1).float(), x[:, 1:].flatten())
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.isfinite().all() and param.grad.abs().sum() > 0, name


# -- options and refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scheme": "int4"}, r"plugins\.qat\.scheme='int4' is not supported"),
        ({"group_size": 0}, r"plugins\.qat\.group_size=0 must be a positive"),
        ({"start_step": -1}, r"plugins\.qat\.start_step=-1"),
    ],
)
def test_bad_options_name_the_key(options, message):
    with pytest.raises(UserError, match=message):
        QAT(**options)


@pytest.mark.parametrize(
    ("options", "config", "message"),
    [
        # d_model 64 is not a multiple of 48: the first layer reading the residual stream fails
        ({"group_size": 48}, MODEL, r"group_size=48 does not divide the in_features=64 of layer layers\.0\.attention"),
        ({"exclude": ["output", "*.w9"]}, MODEL, r"plugins\.qat\.exclude: '\*\.w9' matches no linear layer"),
        ({"exclude": ["*"]}, MODEL, "excludes every linear layer"),
        ({"exclude": []}, TIED, "keep 'output' in plugins.qat.exclude"),
    ],
)
def test_options_that_do_not_fit_the_model_fail_at_build(options, config, message):
    with pytest.raises(UserError, match=message):
        built(QAT(**options), config)


def test_group_size_applies_to_int4_only_and_exclude_patterns_select_layers():
    built(QAT(scheme="int8_weight_only", group_size=48))  # per-channel int8 weights: no groups to divide
    plugin = QAT(exclude=["output", "layers.1.*", "*.wo"])
    built(plugin)
    assert sorted(plugin.layers) == sorted(f"layers.0.{name}" for name in BLOCK_LINEARS if name != "attention.wo")
    cfg = load_train_config(["plugins=[qat]"])
    (default,) = build_plugins(cfg.plugins)
    assert isinstance(default, QAT)
    assert (default.cfg.scheme, default.cfg.group_size, default.cfg.start_step, default.cfg.exclude) == (
        "int8_dynamic_act_int4_weight",
        32,
        0,
        ["output"],
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy=tp", "trainer.devices=2"], "tensor parallelism \\(strategy=tp with tensor-parallel size 2\\)"),
        (["strategy=fsdp_tp", "trainer.devices=4", "strategy.tensor_parallel_size=2"], "strategy=fsdp_tp with"),
        (["strategy=fsdp", "strategy.float8=rowwise"], r"strategy\.float8=rowwise both replace the linear layers"),
    ],
)
def test_tensor_parallelism_and_float8_are_refused_at_start_up(overrides, message):
    def setup(overrides: list[str]) -> None:
        cfg, plugin = load_train_config(["plugins=[qat]", *overrides]), QAT()
        bind_run(plugin, config=cfg, tensor_parallel_size=parallel_sizes(cfg)[2])  # as train.run gives LitLM
        plugin.setup(None, None, "fit")

    with pytest.raises(UserError, match=message):
        setup(overrides)
    setup(["strategy=fsdp", "trainer.devices=2"])


# -- the benefit: QAT fine-tuning quantizes with less loss than quantizing a plainly fine-tuned model ----------


def train_steps(model: Transformer, batches: list[torch.Tensor], lr: float, anneal: bool) -> None:
    """AdamW on next-token loss; with `anneal` the LR decays linearly to 0 over the batches, else it is constant."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / len(batches) if anneal else 1)
    for batch in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).backward()
        optimizer.step()
        schedule.step()


@pytest.mark.slow
def test_qat_fine_tuning_loses_less_to_quantization_than_quantizing_afterwards(tiny_data):
    """Pre-train in float, fine-tune copies on the same batches (plain, and with QAT of each scheme), quantize each
    fine-tuned model for real with the scheme, and compare the held-out loss before and after quantization.

    Everything is quantized, the output head included (exclude=[]): at this size the head carries most of the
    quantization damage. int4 groups of 64 (a whole row of most layers) make that damage clearly measurable.
    """
    schemes, group_size = ("int8_dynamic_act_int4_weight", "int8_weight_only"), 64
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # fastest for a model this small (and the CPU may be shared)
    try:
        train = TokenSamples(open_sources([SourceConfig(str(tiny_data / "train"))], 33, "train"), block_size=33)
        order = torch.randperm(len(train._open()[0]), generator=torch.Generator().manual_seed(1))[:4000].tolist()
        pool = torch.stack([train[(0, i, 0, 0, 1)]["tokens"] for i in order])
        draw = torch.Generator().manual_seed(0)
        batches = [pool[torch.randint(0, len(pool), (16,), generator=draw)] for _ in range(PRETRAIN_STEPS + 100)]
        pretrained = built(None)
        train_steps(pretrained, batches[:PRETRAIN_STEPS], lr=1e-2, anneal=False)
        fine_tuned = {}
        for name in ("plain", *schemes):
            plugin = QAT(scheme=name, group_size=group_size, exclude=[]) if name in schemes else None
            model = built(plugin)
            model.load_state_dict(pretrained.state_dict())
            if plugin is not None:
                plugin.switch(True)
            train_steps(model, batches[PRETRAIN_STEPS:], lr=3e-3, anneal=True)
            fine_tuned[name] = model.state_dict()  # the float weights, as a checkpoint holds them
        results = {}  # (scheme, fine-tune) -> (float loss, quantized loss, the difference)
        for scheme in schemes:
            for name in ("plain", scheme):
                model = float_model(fine_tuned[name])
                loss = held_out_loss(model, tiny_data)
                quantize(model, scheme, group_size, quantized_layer_names(model, exclude=[]))
                quantized = held_out_loss(model, tiny_data)
                results[scheme, "qat" if name == scheme else name] = (loss, quantized, quantized - loss)
    finally:
        torch.set_num_threads(threads)
    print({key: tuple(round(v, 4) for v in value) for key, value in results.items()})
    int4_plain = results["int8_dynamic_act_int4_weight", "plain"]
    int4_qat = results["int8_dynamic_act_int4_weight", "qat"]
    message = (
        f"held-out loss float -> int4: plain fine-tune {int4_plain[0]:.4f} -> {int4_plain[1]:.4f} "
        f"(+{int4_plain[2]:.4f}), QAT fine-tune {int4_qat[0]:.4f} -> {int4_qat[1]:.4f} (+{int4_qat[2]:.4f})"
    )
    assert int4_plain[2] > 0.005, message  # quantizing the plainly fine-tuned model visibly costs
    assert int4_qat[2] < int4_plain[2] / 2, message  # QAT at least halves that cost
    for name in ("plain", "qat"):  # int8 weights (per channel) barely change the model either way
        assert abs(results["int8_weight_only", name][2]) < 2e-3, results["int8_weight_only", name]


# -- real runs: switching on at start_step, resume, export, fsdp ----------------------------------------------


QAT_FROM_STEP_2 = ["plugins=[qat]", "plugins.qat.start_step=2"]


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> Path:
    """Six steps each: plain; with QAT from step 2; the same interrupted after step 4 and resumed from step 3."""
    import lit_open.train.runner as train_module

    root = tmp_path_factory.mktemp("qat-runs")

    def train(name: str, *overrides: str) -> None:
        settings = {**FAST, "trainer.val_check_interval": 3}
        run(load_train_config([*tiny_overrides(tiny_data, root / name, **settings), *overrides]))

    train("plain")
    train("qat", *QAT_FROM_STEP_2)
    real_build = train_module.build_plugins
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "build_plugins", lambda cfg: [*real_build(cfg), CrashAfterStep(4)])
        with pytest.raises(Crash):
            train("split", *QAT_FROM_STEP_2)
    train("split", *QAT_FROM_STEP_2)  # resume=auto from step 3's checkpoint, past start_step
    return root


@pytest.mark.slow
def test_fake_quantization_switches_on_at_start_step_and_after_a_resume(runs):
    plain, qat, split = (train_losses(runs / name) for name in ("plain", "qat", "split"))
    assert sorted(plain) == sorted(qat) == sorted(split) == list(range(1, 7))
    assert (qat[1], qat[2]) == (plain[1], plain[2])  # off for updates 1 and 2: exactly the float model
    assert qat[3] != plain[3]  # on from update 3
    for step in qat:  # the resumed session (steps 4-6) fake-quantizes as the uninterrupted run did
        assert split[step] == pytest.approx(qat[step], rel=1e-6), step
    qat_events = [e for e in read_events(runs / "qat" / "events.jsonl") if e["event"] == "qat"]
    assert [(e["action"], e["step"]) for e in qat_events] == [("fake_quantize_on", 2), ("exported", 6)]
    assert qat_events[0]["layers"] == 14 and qat_events[0]["scheme"] == "int8_dynamic_act_int4_weight"
    split_events = [e for e in read_events(runs / "split" / "events.jsonl") if e["event"] == "qat"]
    assert [(e["action"], e["step"]) for e in split_events] == [
        ("fake_quantize_on", 2),
        ("fake_quantize_on", 3),  # the resumed session, at its first batch
        ("exported", 6),
    ]


@pytest.mark.slow
def test_the_export_reloads_as_the_quantized_final_model(runs):
    out = runs / "qat" / "quantized" / "step-00000006"
    assert sorted(p.name for p in (runs / "qat" / "quantized").iterdir()) == [out.name]  # no temporary left
    assert sorted(p.name for p in out.iterdir()) == ["lit_open.json", "model.pt"]
    loaded = load_quantized(out)
    meta = json.loads((out / "lit_open.json").read_text())
    assert (meta["scheme"], meta["group_size"], meta["step"], meta["start_step"]) == (
        "int8_dynamic_act_int4_weight",
        32,
        6,
        2,
    )
    assert meta["excluded"] == ["output"] and len(meta["layers"]) == 14 and meta["model"]["d_model"] == 64
    (logged,) = [r for r in read_metrics(runs / "qat") if r["step"] == "6" and r["val/loss"]]
    assert (meta["val_loss_step"], meta["val_loss"]) == (6, float(logged["val/loss"]))  # fake-quantized
    assert type(loaded.layers[1].feed_forward.w2.weight).__name__ == "IntxUnpackedToInt8Tensor"
    # the float weights of the final checkpoint, quantized here, give exactly the reloaded model's logits
    final = float_model(checkpoint_weights(runs / "qat" / "checkpoints" / "step-00000006.ckpt"))
    with torch.no_grad():
        float_logits = final(tokens())
        expected = quantize(final, meta["scheme"], meta["group_size"], meta["layers"])(tokens())
        assert torch.equal(loaded(tokens()), expected)
    assert not torch.allclose(expected, float_logits, atol=1e-3)
    with pytest.raises(UserError, match="is not a qat export"):
        load_quantized(runs / "qat")


def test_validations_see_the_model_as_trained_so_far_or_as_the_checkpoint_had_it():
    events = []
    module = None
    recorder = SimpleNamespace(write=lambda step, event, **fields: events.append((step, fields)))
    plugin = QAT(start_step=5)
    bind_run(plugin, events=recorder)
    built(plugin)
    plugin.on_validation_start(SimpleNamespace(global_step=0), module)  # validate_at_start of a fresh run
    assert not plugin.active
    plugin.on_fit_start(None, module)
    plugin.on_train_batch_start(SimpleNamespace(global_step=5), module, None, 0)
    assert plugin.active and plugin.state_dict() == {"active": True}
    plugin.on_validation_start(SimpleNamespace(global_step=6), module)  # the validation after fit()
    assert plugin.active and [(step, fields["action"]) for step, fields in events] == [(5, "fake_quantize_on")]

    resumed = QAT(start_step=5)
    bind_run(resumed, events=recorder)
    built(resumed)
    resumed.load_state_dict({"active": False})  # resumed from step 3's checkpoint
    resumed.on_fit_start(None, module)
    resumed.on_validation_start(SimpleNamespace(global_step=5), module)  # training derives it from the step
    assert resumed.active

    evaluated = QAT(start_step=5)
    bind_run(evaluated, events=recorder)
    built(evaluated)
    evaluated.load_state_dict({"active": True})  # lit-open eval of step 6's checkpoint counts no steps
    evaluated.on_validation_start(SimpleNamespace(global_step=0), module)
    assert evaluated.active


@pytest.mark.slow
def test_an_fsdp_run_on_two_processes_from_the_command_line_trains_as_the_single_process_run(runs, tiny_data, tmp_path):
    """FSDP2 shards the float weights; each forward fake-quantizes the gathered ones; rank 0 writes the export."""
    settings = {**FAST, "trainer.val_check_interval": 3, "strategy": "fsdp", "trainer.devices": 2}
    result = run_cli("train", *tiny_overrides(tiny_data, tmp_path / "fsdp", **settings), *QAT_FROM_STEP_2)
    assert result.returncode == 0, result.stderr[-4000:]
    fsdp, qat = train_losses(tmp_path / "fsdp"), train_losses(runs / "qat")
    assert sorted(fsdp) == sorted(qat)
    for step in qat:
        assert fsdp[step] == pytest.approx(qat[step], rel=1e-4), step
    events = [e for e in read_events(tmp_path / "fsdp" / "events.jsonl") if e["event"] == "qat"]
    assert [(e["action"], e["step"]) for e in events] == [("fake_quantize_on", 2), ("exported", 6)]
    exported = load_quantized(tmp_path / "fsdp" / "quantized" / "step-00000006")
    with torch.no_grad():  # the same model up to float rounding (which may move a weight to the next int4 level)
        difference = exported(tokens()) - load_quantized(runs / "qat" / "quantized" / "step-00000006")(tokens())
    assert difference.abs().max() < 0.05
