"""`python -m lit_open.bench attention`: parity of the CPU kernels, the FLOP count, skipped and failed backends."""

from __future__ import annotations

import argparse

import pytest
import torch

from lit_open.bench import attention
from lit_open.errors import UserError
from lit_open.model.attention import _why_unavailable

TINY = ["--device", "cpu", "--batch", "2", "--seq-len", "48", "--heads", "4", "--kv-heads", "2", "--head-dim", "16"]
TINY += ["--mean-doc-len", "8", "--repeats", "1", "--warmup", "0"]


def bench(*options: str) -> dict:
    parser = argparse.ArgumentParser()
    attention.add_arguments(parser)
    return attention.run(parser.parse_args([*TINY, *options]))


def test_cpu_backends_match_the_float32_reference():
    result = bench("--backends", "flash_attn,varlen,flex,sdpa,dense,math")
    config, backends = result["config"], result["results"]["backends"]
    assert config["device"] == "cpu" and config["dtype"] == "float32" and config["kv_heads"] == 2
    for name in ("sdpa", "dense", "math"):
        r = backends[name]
        assert r["status"] == "ok" and r["parity"] == "ok" and r["backward"], (name, r)
        assert set(r["errors"]) == {"out", "dq", "dk", "dv"}
        assert all(e["max_abs"] < 1e-5 and e["rel"] < 1e-5 for e in r["errors"].values()), (name, r["errors"])
        assert r["forward_ms"] > 0 and r["forward_backward_ms"] > 0
    assert backends["sdpa"]["masking"] == "causal" and backends["dense"]["masking"] == "documents"
    # flex has no backward on CPU: its forward runs (eagerly) and is checked
    flex = backends["flex"]
    assert flex["status"] == "ok" and not flex["backward"] and flex["forward_backward_ms"] is None
    assert set(flex["errors"]) == {"out"} and flex["errors"]["out"]["max_abs"] < 1e-5
    assert flex["note"].startswith("forward only: FlexAttention has no backward")
    for name in ("flash_attn", "varlen"):  # no package here, or no CUDA
        reason = _why_unavailable(name, torch.device("cpu"), torch.float32, False)
        assert backends[name] == {"status": "skipped", "note": reason}
    assert "flash-attn" in backends["flash_attn"]["note"] or "CUDA" in backends["flash_attn"]["note"]


def test_flops_of_a_hand_made_layout():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]])
    lengths = attention.document_lengths(doc_ids)
    assert lengths == [[3, 2], [1, 4]]
    # visible entries: 3*4/2 + 2*3/2 + 1*2/2 + 4*5/2 = 6 + 3 + 1 + 10 = 20; 4 * head_dim 8 * 2 heads each
    assert attention.attention_flops(lengths, heads=2, head_dim=8) == 4 * 8 * 2 * 20 == 1280
    assert attention.attention_flops([[5], [5]], heads=2, head_dim=8) == 4 * 8 * 2 * 30


def test_reported_tflops_follow_the_layout():
    result = bench("--backends", "dense,sdpa")
    layout, backends = result["results"]["layout"], result["results"]["backends"]
    doc_ids = attention.document_ids(2, 48, 8, seed=0)
    assert layout["documents_per_row"] == [len(row) for row in attention.document_lengths(doc_ids)]
    assert layout["forward_flops"] == attention.attention_flops(attention.document_lengths(doc_ids), 4, 16)
    assert layout["forward_flops_causal"] == 4 * 16 * 4 * 2 * (48 * 49 // 2)
    for name, flops in (("dense", layout["forward_flops"]), ("sdpa", layout["forward_flops_causal"])):
        r = backends[name]
        assert r["forward_tflops"] == pytest.approx(flops / (r["forward_ms"] * 1e-3) / 1e12)
        assert r["forward_backward_tflops"] == pytest.approx(3.5 * flops / (r["forward_backward_ms"] * 1e-3) / 1e12)


def test_document_layout_is_seeded_packed_and_varied():
    doc_ids = attention.document_ids(4, 256, 32, seed=3)
    assert doc_ids.shape == (4, 256) and doc_ids.dtype == torch.int32
    assert torch.equal(doc_ids, attention.document_ids(4, 256, 32, seed=3))
    assert not torch.equal(doc_ids, attention.document_ids(4, 256, 32, seed=4))
    assert (doc_ids[:, 0] == 0).all() and (doc_ids.diff(dim=1) >= 0).all() and (doc_ids.diff(dim=1) <= 1).all()
    counts = [len(row) for row in attention.document_lengths(doc_ids)]
    assert min(counts) >= 2 and 4 <= sum(counts) / len(counts) <= 16  # about 256 / 32 = 8 per row


def test_unknown_backend_names_the_valid_ones():
    with pytest.raises(UserError, match="unknown fast; choose among flash_attn, sdpa, varlen, flex, dense, math"):
        bench("--backends", "dense,fast")


def test_bad_sizes_are_user_errors():
    with pytest.raises(UserError, match="--heads 4 is not a multiple of --kv-heads 3"):
        bench("--kv-heads", "3")
    with pytest.raises(UserError, match="--seq-len 0"):
        bench("--seq-len", "0")


def test_a_raising_backend_is_recorded_as_failed_and_the_others_still_run(monkeypatch):
    real = attention.causal_attention

    def broken_dense(q, k, v, backend="auto", doc_ids=None):
        if backend == "dense":
            raise RuntimeError("CUDA out of memory. Tried to allocate 4.00 GiB\nmore detail")
        return real(q, k, v, backend=backend, doc_ids=doc_ids)

    monkeypatch.setattr(attention, "causal_attention", broken_dense)
    backends = bench("--backends", "dense,sdpa")["results"]["backends"]
    assert backends["dense"] == {
        "status": "failed",
        "note": "RuntimeError: CUDA out of memory. Tried to allocate 4.00 GiB",
    }
    assert backends["sdpa"]["status"] == "ok" and backends["sdpa"]["parity"] == "ok"


def test_an_output_off_by_more_than_the_tolerance_is_a_mismatch(monkeypatch):
    real = attention.causal_attention

    def skewed_dense(q, k, v, backend="auto", doc_ids=None):
        out = real(q, k, v, backend=backend, doc_ids=doc_ids)
        return out + 1e-3 if backend == "dense" else out  # 10x the float32 tolerance; the gradients stay exact

    monkeypatch.setattr(attention, "causal_attention", skewed_dense)
    dense = bench("--backends", "dense")["results"]["backends"]["dense"]
    assert dense["parity"] == "MISMATCH"
    assert dense["errors"]["out"]["max_abs"] == pytest.approx(1e-3, rel=1e-2)
    assert dense["errors"]["dq"]["max_abs"] < 1e-5
