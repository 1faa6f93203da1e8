"""`python -m lit_open.bench`: the throughput JSON and runners, the FLOP formula and peak table, loss-memory."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from lit_open.bench import throughput
from lit_open.bench.__main__ import build_parser, main
from lit_open.bench.runners import litgpt_unavailable
from lit_open.compose import load_train_config
from lit_open.errors import UserError
from lit_open.hardware import compute_dtype, peak_flops
from lit_open.model.flops import flops_per_token, non_embedding_parameters

REPO = Path(__file__).resolve().parents[2]


def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lit_open.bench", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_throughput_on_cpu_writes_json_for_lightning_and_bare(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--model", "quickstart", "--micro-batch", "2", "--seq-len", "64", "--steps", "4", "--warmup", "1"]
    args += ["--runners", "lightning,bare,bare_sync,litgpt"]
    result = bench("throughput", *args, "--device", "cpu", "--json", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "lightning" in result.stdout and "bare" in result.stdout  # the table

    report = json.loads(out.read_text())
    assert report["benchmark"] == "throughput"
    assert report["command"].startswith("python -m lit_open.bench throughput --model quickstart")
    assert report["date"] and report["device"]["type"] == "cpu" and report["device"]["name"]
    assert {"torch", "lightning", "lit_open"} <= set(report["versions"])
    config = report["config"]
    assert (config["model"], config["micro_batch"], config["seq_len"]) == ("quickstart", 2, 64)
    assert (config["steps"], config["warmup"], config["precision"], config["device"]) == (4, 1, "32-true", "cpu")
    # two rounds of three steps per runner (the first of each turn untimed) after one warmup step
    assert (config["rounds"], config["round_steps"], config["schedule"]) == (2, 3, "interleaved")
    assert config["train_config"]["data"]["global_batch_size"] == 2  # one micro-batch per optimizer step

    results = report["results"]
    expected = hand_flops_per_token_quickstart(seq_len=64)
    assert results["flops_per_token"] == expected
    assert results["peak_flops"] is None  # a CPU: MFU n/a
    runners = results["runners"]
    assert runners["litgpt"]["status"] in ("ok", "skipped", "failed")
    losses = {}
    for name in ("lightning", "bare", "bare_sync"):
        r = runners[name]
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["seconds"] > 0 and r["tokens"] == 4 * 2 * 64
        assert len(r["round_seconds"]) == 2 and r["seconds"] == pytest.approx(sum(r["round_seconds"]))
        assert r["tokens_per_s"] == pytest.approx(statistics.median(2 * 2 * 64 / s for s in r["round_seconds"]))
        assert len(r["losses"]) == 1 + 2 * 3
        assert r["flops_per_token"] == expected
        assert r["achieved_tflops"] == pytest.approx(expected * r["tokens_per_s"] / 1e12)
        assert r["mfu"] is None
        assert r["peak_memory_gib"] > 0
        assert math.isfinite(r["first_loss"]) and math.isfinite(r["loss"]) and r["loss_finite"]
        losses[name] = r["losses"]
    # same model, seed, data, optimizer and schedule: Lightning and the bare loop take the same steps, taking turns
    assert losses["lightning"] == pytest.approx(losses["bare"], rel=1e-5)
    assert losses["bare_sync"] == losses["bare"]  # reading back changes nothing but the waiting
    assert losses["bare"][-1] < losses["bare"][0]
    lightning, bare = runners["lightning"]["round_tokens_per_s"], runners["bare"]["round_tokens_per_s"]
    per_round = [100 * (b / a - 1) for a, b in zip(lightning, bare)]  # the bare loop's speed over Lightning's
    assert results["lightning_overhead_pct"] == pytest.approx(statistics.median(per_round))
    assert results["lightning_overhead_pct_range"] == pytest.approx([min(per_round), max(per_round)])
    assert results["reference"] == "bare" and runners["bare"]["vs_reference"]["median"] == 1.0


def hand_flops_per_token_quickstart(seq_len: int) -> int:
    """6*N + 12*L*d*T for conf/model/quickstart.yaml, counted by hand (tied embedding: counted once, as the head)."""
    vocab, d, layers, d_ff = 1024, 192, 4, 512  # vocab 1024 is already a multiple of 128: no padding
    per_block = 4 * d * d + 3 * d * d_ff + 2 * d  # wq wk wv wo, SwiGLU w1 w2 w3, two RMSNorm weights
    n = layers * per_block + d + vocab * d  # + final norm + the (tied) output head
    assert n == 1_967_808
    return 6 * n + 12 * layers * d * seq_len


def test_flops_formula_counts_the_head_but_not_the_input_embedding():
    quickstart = load_train_config(["model=quickstart"]).model  # tied embeddings
    assert non_embedding_parameters(quickstart) == 1_967_808
    assert flops_per_token(quickstart, 64) == hand_flops_per_token_quickstart(64)
    olmo = load_train_config(["model=olmo2_1b"]).model  # untied: the embedding is left out, the head counted
    d, vocab = 2048, 100352
    per_block = 4 * d * d + 3 * d * 8192 + 4 * d  # + attention/ffn norms and the full-width q/k norms
    n = 16 * per_block + d + vocab * d
    assert non_embedding_parameters(olmo) == n == 1_279_395_840
    assert flops_per_token(olmo, 4096) == 6 * n + 12 * 16 * d * 4096 == 9_286_987_776


def test_peak_table_lookup():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA A10G") == 125e12  # not taken for an A100
    assert peak_flops("NVIDIA L40S") == 362e12 and peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp32") == pytest.approx(66.9e12)
    assert peak_flops("Some Future Accelerator") is None
    assert peak_flops(None) is None


def test_compute_dtype_is_bf16_for_bf16_and_float8_matmuls():
    assert compute_dtype(load_train_config(["trainer.precision=bf16-mixed"])) == "bf16"
    assert compute_dtype(load_train_config(["trainer.precision=32-true", "strategy.float8=tensorwise"])) == "bf16"
    assert compute_dtype(load_train_config(["trainer.precision=32-true"])) in ("tf32", "fp32")


def test_litgpt_runner_starts_from_the_loss_of_the_lit_open_runners():
    """litgpt's GPT, initialised as litgpt pretrains it, starts near ln(vocab) like lit-open's model (same sizes,
    same batches). With PyTorch's default initialisation (embedding ~ N(0, 1), tied to the head) it started at 244."""
    if why := litgpt_unavailable():
        pytest.skip(why)
    args = ["throughput", "--model", "quickstart", "--micro-batch", "2", "--seq-len", "64", "--steps", "1"]
    args += ["--warmup", "1", "--device", "cpu", "--runners", "bare,litgpt"]
    runners = throughput.run(build_parser("throughput").parse_args(args))["results"]["runners"]
    bare, litgpt = runners["bare"], runners["litgpt"]
    assert litgpt["status"] == "ok", litgpt
    assert bare["first_loss"] == pytest.approx(math.log(1024), abs=0.3)  # quickstart's vocabulary: 1024 tokens
    # different random weights, the same scale: a few tenths apart (0.15 when this was written), not 237
    assert litgpt["first_loss"] == pytest.approx(bare["first_loss"], abs=0.5)
    assert litgpt["loss_finite"]


def test_bad_runner_is_a_user_error():
    args = build_parser("throughput").parse_args(["throughput", "--runners", "lightning,nope", "--device", "cpu"])
    with pytest.raises(UserError, match="'nope': a runner is one of lightning, bare, bare_sync, litgpt, olmo_core"):
        throughput.run(args)
    args = build_parser("throughput").parse_args(["throughput", "--runners", "bare+float8", "--device", "cpu"])
    with pytest.raises(UserError, match=r"optionally followed by \+KEY=VALUE"):
        throughput.run(args)
    args = build_parser("throughput").parse_args(["throughput", "--reference", "litgpt", "--runners", "bare"])
    with pytest.raises(UserError, match="--reference 'litgpt' is not among --runners"):
        throughput.run(args)
    args = build_parser("throughput").parse_args(["throughput", "--runners", "bare+strategy.nope=1", "--device", "cpu"])
    with pytest.raises(UserError, match="nope"):  # every runner's config is composed before anything is built
        throughput.run(args)


def test_loss_memory_subcommand_dispatch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--vocab-size", "4096", "--tokens", "512", "--d-model", "64", "--chunk-tokens", "128", "--dtype", "float32"]
    main(["loss-memory", *args])
    report = json.loads((tmp_path / "bench-loss-memory.json").read_text())  # the default --json path
    assert report["benchmark"] == "loss-memory" and report["device"]["type"] == "cpu"
    assert report["command"] == "python -m lit_open.bench loss-memory " + " ".join(args)
    assert report["config"]["vocab_size"] == 4096
    naive, chunked = report["results"]["naive"], report["results"]["chunked"]
    assert naive["loss"] == pytest.approx(chunked["loss"], rel=1e-5)
    assert "memory_ratio" in report["results"]


@pytest.mark.slow
def tiny_data_overrides(tiny_data: Path) -> list[str]:
    """The benchmarks' runs on the session's tiny corpus, without held-out data."""
    return [
        f"data.sources=[{{path:{tiny_data}/train}}]",
        "data.val_sources=[]",
        f"data.tokenizer={tiny_data / 'tokenizer.json'}",
        "data.prepare=null",
        "model.vocab_size=512",
    ]


def test_plugin_overhead_times_the_plugins_hooks_and_both_runs(tiny_data, tmp_path):
    data = tiny_data_overrides(tiny_data)
    args = ["plugin-overhead", "--steps", "10", "--repeats", "1", "--seq-len", "32", "--micro-batch", "4"]
    report = main([*args, "--json", str(tmp_path / "overhead.json"), *data, "plugins.monitor.every_n_steps=5"])
    results = report["results"]
    # monitored steps 5 and 10, plus the hooks of every step: the plugin's methods were called and timed
    assert results["hook_calls"] > 10 and 0 < results["in_hook_share"] < 1
    assert results["ab_time_ratio"] == pytest.approx(results["train_seconds_with"] / results["train_seconds_without"])
    assert json.loads((tmp_path / "overhead.json").read_text())["benchmark"] == "plugin-overhead"


def test_checkpoint_bench_times_the_blocked_seconds_of_every_periodic_save_both_ways(tiny_data, tmp_path):
    data = tiny_data_overrides(tiny_data)
    model = ["--layers", "2", "--d-model", "64", "--heads", "4", "--d-ff", "128", "--seq-len", "32"]
    args = ["checkpoint", *model, "--steps", "5", "--every", "2", "--dir", str(tmp_path)]
    report = main([*args, "--json", str(tmp_path / "checkpoint.json"), *data])
    results = report["results"]
    for mode in ("sync", "async"):  # the periodic saves of steps 2 and 4 (not the final one at step 5)
        assert len(results[mode]["blocked_s"]) == 2 and all(s > 0 for s in results[mode]["blocked_s"])
        assert results[mode]["write_s_median"] > 0 and results[mode]["checkpoint_bytes"] > 100_000
    ratio = results["async"]["blocked_s_median"] / results["sync"]["blocked_s_median"]
    assert results["blocked_ratio_async_over_sync"] == pytest.approx(ratio)
    assert results["parameters"] == 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 512 * 64 + 64  # tied head
    assert not list(tmp_path.glob("tmp*"))  # the runs' directories are removed
