"""`python -m lit_open.bench memory`: the per-GPU memory estimate against saved-tensor counts, a CPU peak, sharding."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
import torch
import yaml

from lit_open.bench.__main__ import main
from lit_open.bench.memory import LOSS_LOGIT_COPIES, estimate, measure_cpu, parameter_counts
from lit_open.compose import conf_dir
from lit_open.model import ModelConfig, Transformer
from lit_open.model.model import num_parameters
from lit_open.train.loss import lm_loss

PRESETS = sorted((conf_dir() / "model").glob("*.yaml"))
TINY = {"vocab_size": 1024, "n_layer": 2, "d_model": 64, "n_head": 4, "d_ff": 96, "max_seq_len": 64}
LAYOUTS = {
    "llama": {},
    "gqa": {"n_kv_head": 2},
    "olmo2": {"norm_placement": "post", "qk_norm": "full"},
    "head_qk_norm": {"qk_norm": "head"},
    "neox": {"norm": "layernorm", "parallel_residual": True, "mlp": "gelu", "bias": True, "rotary_fraction": 0.25},
    "dense": {"attention": "dense"},
    "math": {"attention": "math"},
}


def preset(name: str) -> ModelConfig:
    fields = yaml.safe_load(next(p for p in PRESETS if p.stem == name).read_text())
    return ModelConfig(**fields)


def test_presets_are_found():
    assert {"quickstart", "olmo2_1b", "pythia_160m"} <= {p.stem for p in PRESETS}


@pytest.mark.parametrize("name", [p.stem for p in PRESETS])
def test_parameter_term_is_the_real_parameter_count_times_its_bytes(name):
    config = preset(name)
    with torch.device("meta"):  # sizes only: k2_65b would not fit in memory
        real = num_parameters(Transformer(config))
    assert sum(parameter_counts(config).values()) == real
    seq = min(config.max_seq_len, 256)
    assert estimate(config, seq_len=seq, micro_batch=1).parameters == 4 * real
    bf16 = estimate(config, seq_len=seq, micro_batch=1, precision="bf16-true")
    assert bf16.parameters == bf16.gradients == 2 * real and bf16.optimizer == 4 * real


def saved_for_backward(config: ModelConfig, precision: str, doc_ids: torch.Tensor | None, B: int, T: int):
    """Bytes of the tensors that a forward pass and the chunked loss save for backward (each storage once,
    parameters and buffers left out), and of autocast's bf16 weight copies (saved transposed, by the matmuls)."""
    torch.manual_seed(0)
    model = Transformer(config)
    if precision == "bf16-true":
        model.to(torch.bfloat16)
    static = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    activations, weight_copies = {}, {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in static:
            found = weight_copies if type(t.grad_fn).__name__ == "TBackward0" else activations
            found[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(config.vocab_size, (B, T))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        hidden = model(ids, doc_ids, return_hidden=True)
        lm_loss(hidden, model.output, ids, chunk_tokens=16)
    return sum(activations.values()), sum(weight_copies.values())


CASES = [
    (layout, precision, docs)
    for layout in LAYOUTS
    for precision in ("32-true", "bf16-true", "bf16-mixed")
    for docs in ((False, True) if layout in ("dense", "math") else (False,))
    # CPU autocast keeps math's probabilities in bf16 only; the estimate counts CUDA's (float32 + a bf16 cast)
    if not (layout == "math" and precision == "bf16-mixed")
]


@pytest.mark.parametrize(("layout", "precision", "docs"), CASES)
def test_activation_terms_equal_the_saved_tensors_of_a_tiny_model(layout, precision, docs):
    config = ModelConfig(**TINY, **LAYOUTS[layout])
    B, T = 2, 24  # 48 tokens: three chunks of the loss
    doc_ids = torch.zeros(B, T, dtype=torch.int32)
    doc_ids[:, T // 2 :] = 1
    saved, copies = saved_for_backward(config, precision, doc_ids if docs else None, B, T)
    found = estimate(config, seq_len=T, micro_batch=B, precision=precision, loss_chunk_tokens=16, document_mask=docs)
    assert found.activations + found.attention == pytest.approx(saved, abs=16)  # the loss's two scalars
    if precision == "bf16-mixed":  # the head's copy is made inside the loss's checkpointed chunks, not seen here
        head = 2 * config.padded_vocab_size * config.d_model
        assert found.weight_copies - head == copies == 2 * parameter_counts(config)["block_matrices"]
    else:
        assert found.weight_copies == copies == 0


SMALL = {"vocab_size": 4096, "n_layer": 4, "d_model": 128, "n_head": 4, "d_ff": 512, "max_seq_len": 512}


def test_full_checkpointing_estimate_within_15_percent_of_the_cpu_peak():
    """Recomputation of one block plus its gradients in flight is the peak here (the loss's chunks are smaller)."""
    config = ModelConfig(**SMALL)
    settings = {"seq_len": 512, "micro_batch": 2, "activation_checkpointing": "full", "loss_chunk_tokens": 128}
    found = estimate(config, **settings)
    assert found.peak_phase == "backward"
    measured = measure_cpu(config, **settings)
    assert found.total / measured["peak_increase_bytes"] == pytest.approx(1.0, abs=0.15), (found, measured)


def test_cli_measures_on_cpu_and_reports_the_ratio(tmp_path, capsys):
    """No checkpointing, a chunked loss: the peak is the loss's backward with every activation still saved."""
    out = tmp_path / "memory.json"
    args = ["--model", "quickstart", "--d-model", "128", "--n-layer", "2", "--vocab-size", "4096", "--seq-len", "512"]
    args += ["--micro-batch", "2", "--loss-chunk-tokens", "256", "--measure", "--json", str(out)]
    main(["memory", *args])
    assert "estimate / measured" in capsys.readouterr().out
    report = json.loads(out.read_text())
    results, config = report["results"], report["config"]
    assert config["precision"] == "32-true" and config["model_config"]["max_seq_len"] == 512  # raised for the check
    assert results["estimate"]["peak_phase"] == "loss"
    measured = results["measured"]["peak_increase_bytes"]
    assert results["ratio"] == pytest.approx(results["estimate"]["total"] / measured)
    assert results["ratio"] == pytest.approx(1.0, abs=0.15), results


def test_cli_writes_the_breakdown_to_json(tmp_path, capsys):
    out = tmp_path / "olmo.json"
    args = ["--model", "olmo2_1b", "--seq-len", "4096", "--micro-batch", "4", "--data-parallel", "8"]
    args += ["--activation-checkpointing", "selective", "--precision", "bf16-mixed", "--json", str(out)]
    main(["memory", *args])
    assert "weight_copies" in capsys.readouterr().out  # the table
    report = json.loads(out.read_text())
    assert report["benchmark"] == "memory"
    assert report["command"] == "python -m lit_open.bench memory " + " ".join(args)
    config = report["config"]
    assert (config["model"], config["seq_len"], config["data_parallel"], config["param_dtype"]) == (
        "olmo2_1b",
        4096,
        8,
        None,
    )
    expected = estimate(
        preset("olmo2_1b"),
        seq_len=4096,
        micro_batch=4,
        data_parallel=8,
        activation_checkpointing="selective",
        precision="bf16-mixed",
    )
    results = report["results"]
    assert results["estimate"] == expected.to_dict()
    assert results["estimate_gib"]["total"] == pytest.approx(expected.total / 2**30)
    assert "measured" not in results


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--model", "nope"], "nope"),
        (["--model", "olmo2_1b", "--seq-len", "4094", "--context-parallel", "2"], "--seq-len 4094"),
        (["--model", "olmo2_1b", "--tensor-parallel", "3"], "--tensor-parallel 3"),
        (["--model", "quickstart", "--n-head", "5"], "model.n_head=5"),
        (["--model", "olmo2_1b", "--seq-len", "8192"], "--seq-len 8192"),
        (["--model", "quickstart", "--micro-batch", "0"], "--micro-batch 0"),
        (["--model", "quickstart", "--measure", "--data-parallel", "2"], "--data-parallel is 2"),
        (["--model", "olmo2_1b", "--context-parallel", "2", "--attention", "flash_attn"], "flash_attn"),
    ],
)
def test_cli_rejects_bad_input_with_exit_2(args, named, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["memory", *args, "--json", str(tmp_path / "never.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m lit_open.bench memory: error: ") and named in err, err
    assert len(err.strip().splitlines()) == 1  # one paragraph, no traceback
    assert not (tmp_path / "never.json").exists()


def test_sharding_divides_what_it_should():
    config = preset("olmo2_1b")
    common = {"seq_len": 4096, "micro_batch": 2, "precision": "bf16-mixed", "param_dtype": "bfloat16"}
    base = estimate(config, data_parallel=2, **common)
    dp = estimate(config, data_parallel=4, **common)
    for term in ("parameters", "gradients", "optimizer"):
        assert getattr(dp, term) == pytest.approx(getattr(base, term) / 2, abs=1)
    for term in ("weight_copies", "activations", "attention", "loss", "backward"):
        assert getattr(dp, term) == getattr(base, term)

    cp = estimate(config, data_parallel=2, context_parallel=2, **common)  # FSDP shards over dp x cp ranks
    assert cp.parameters == pytest.approx(base.parameters / 2, abs=1)
    assert cp.activations == pytest.approx(base.activations / 2, abs=1)
    assert cp.attention == base.attention > 0  # each layer all-gathers the whole sequence's keys and values

    tp = estimate(config, data_parallel=2, tensor_parallel=2, **common)
    assert tp.parameters == pytest.approx(base.parameters / 2, rel=1e-3)  # only the block norms stay whole
    assert tp.attention == base.attention / 2
    assert base.activations / 2 < tp.activations < base.activations  # the gathered projection inputs stay whole


def test_checkpointing_and_loss_chunking_shrink_their_terms():
    config = preset("olmo2_1b")
    common = {"seq_len": 4096, "micro_batch": 4, "precision": "bf16-mixed", "param_dtype": "bfloat16"}
    none, selective, full = (
        estimate(config, activation_checkpointing=mode, **common) for mode in ("none", "selective", "full")
    )
    assert none.activations > selective.activations > full.activations
    assert none.total > selective.total > full.total
    assert full.backward > none.backward  # one block recomputed during the backward pass
    off = estimate(config, loss_chunk_tokens=0, **common)
    vocab = config.padded_vocab_size
    assert off.loss - none.loss == LOSS_LOGIT_COPIES * (4 * 4096 - 1024) * vocab * 4
    assert dataclasses.replace(none, loss=off.loss).total == off.total
    eight_bit = estimate(config, optimizer="adamw8bit", **common)
    assert eight_bit.optimizer == pytest.approx(none.optimizer / 4, rel=0.01)
