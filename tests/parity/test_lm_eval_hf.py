"""The lm-eval adapter (lit_open.eval.harness) against lm-eval's own Hugging Face runner on the same model.

A tiny model, trained a few steps on the tiny_data corpus so that its answers differ, is scored by our adapter and
exported with `save_hf` for `lm_eval.models.huggingface.HFLM` (transformers' LlamaForCausalLM on the export). On
a local multiple-choice task and a local perplexity task (documents longer than the context: several rolling
windows each) both give the same accuracy and log-likelihoods within 1e-4, request by request and aggregated.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from lm_eval_tasks import trained_tiny_model, write_local_tasks

from lit_open.checkpoint.hf import save_hf
from lit_open.data.tokenizer import tokenizer_and_eos
from lit_open.eval.harness import LitOpenLM, load_tasks, resolve_tasks, run_tasks

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup(tiny_data, tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("lm-eval-parity")
    monkeypatch_module.setenv("HF_DATASETS_CACHE", str(root / "datasets-cache"))
    model = trained_tiny_model(tiny_data)
    tasks = write_local_tasks(tiny_data.parent / "corpus", root / "tasks")
    export = save_hf(model, root / "hf", tokenizer_dir=tiny_data)
    return model, tasks, export, tiny_data


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def hf_runner(export, tokenizer_json):
    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedTokenizerFast

    # the export has tokenizer.json but no tokenizer_config.json: name the end-of-document token here
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token="<|endoftext|>")
    return HFLM(pretrained=str(export), tokenizer=tokenizer, device="cpu", dtype="float32", batch_size=4)


def requests_of(task_dict, name):
    task = task_dict["tasks"][name]
    task.build_all_requests(limit=None, rank=0, world_size=1)
    return [instance for instance in task.instances]


def test_adapter_matches_hflm_request_by_request_and_in_aggregate(setup):
    model, tasks, export, data = setup
    tokenizer, eos = tokenizer_and_eos(data / "tokenizer.json")
    ours = LitOpenLM(model, tokenizer, eos, batch_size=5)
    theirs = hf_runner(export, data / "tokenizer.json")
    assert type(theirs.model).__name__ == "LlamaForCausalLM"  # transformers' model on the export
    assert theirs.max_length == ours.max_length == 64
    assert theirs.prefix_token_id == ours.prefix_token_id == eos

    specs = resolve_tasks([str(tasks)])
    task_dict = load_tasks(specs)
    mc_requests = requests_of(task_dict, "next_line")
    ppl_requests = requests_of(task_dict, "corpus_ppl")
    assert len(mc_requests) == 24 * 4 and len(ppl_requests) == 6
    assert all(len(ours.tok_encode(r.args[0])) > 64 for r in ppl_requests)  # several windows per document

    ours_ll, theirs_ll = ours.loglikelihood(mc_requests), theirs.loglikelihood(mc_requests)
    mc_deltas = [abs(a[0] - b[0]) for a, b in zip(ours_ll, theirs_ll)]
    assert max(mc_deltas) < 1e-4, max(mc_deltas)
    assert [a[1] for a in ours_ll] == [b[1] for b in theirs_ll]  # greedy flags
    assert len({round(a[0], 3) for a in ours_ll}) > 50  # the model discriminates: the test could fail

    ours_rolling = ours.loglikelihood_rolling(ppl_requests)
    theirs_rolling = theirs.loglikelihood_rolling(ppl_requests)
    deltas = [abs(a - b) for a, b in zip(ours_rolling, theirs_rolling)]
    assert max(deltas) < 1e-4 * max(1.0, max(abs(b) for b in theirs_rolling)), (deltas, theirs_rolling)

    ours_result = run_tasks(ours, load_tasks(specs))
    theirs_result = run_tasks(theirs, load_tasks(specs))  # lm-eval's evaluator, with HFLM as the model
    a, b = ours_result.metrics, theirs_result.metrics
    assert a.keys() == b.keys() >= {"eval/next_line/acc", "eval/next_line/acc_norm", "eval/corpus_ppl/bits_per_byte"}
    assert a["eval/next_line/acc"] == b["eval/next_line/acc"]
    assert a["eval/next_line/acc_norm"] == b["eval/next_line/acc_norm"]
    assert 0.25 < a["eval/next_line/acc"] < 1.0  # better than chance, not perfect
    for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert math.isclose(a[f"eval/corpus_ppl/{key}"], b[f"eval/corpus_ppl/{key}"], rel_tol=1e-5), key
    print(f"max |delta| loglikelihood {max(mc_deltas):.2e}, rolling {max(deltas):.2e}; {a}; {ours_result.seconds:.2f}s")


def test_repeated_runs_and_batch_sizes_agree(setup):
    model, tasks, _, data = setup
    tokenizer, eos = tokenizer_and_eos(data / "tokenizer.json")
    task_dict = load_tasks(resolve_tasks([str(tasks)]))
    first = run_tasks(LitOpenLM(model, tokenizer, eos, batch_size=1), task_dict, limit=8).metrics
    again = run_tasks(LitOpenLM(model, tokenizer, eos, batch_size=16), task_dict, limit=8).metrics
    assert first.keys() == again.keys()
    for key in first:
        assert math.isclose(first[key], again[key], rel_tol=1e-5), key
    assert model.training is False


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_adapter_on_a_device_scores_and_generates_as_on_the_cpu(setup, device, tmp_path):
    """The adapter with the model moved to `device` (float32): the same log-likelihoods, greedy flags, rolling
    log-likelihoods and greedy generations as with the model on the CPU."""
    model, _, _, data = setup
    tasks = write_local_tasks(data.parent / "corpus", tmp_path / "tasks", generation=True)
    tokenizer, eos = tokenizer_and_eos(data / "tokenizer.json")
    on_cpu = LitOpenLM(model, tokenizer, eos, batch_size=8)
    on_device = LitOpenLM(copy.deepcopy(model).to(device), tokenizer, eos, batch_size=8)
    assert on_device._device.type == device and model.output.weight.device.type == "cpu"
    task_dict = load_tasks(resolve_tasks([str(tasks)]))
    mc, ppl, gen = (requests_of(task_dict, name) for name in ("next_line", "corpus_ppl", "line_end"))
    assert (len(mc), len(ppl), len(gen)) == (24 * 4, 6, 12)

    # float32 on both: the kernels' sums run in other orders (~1e-6 relative per logit), and a log-likelihood sums
    # up to a few hundred tokens' log-probabilities: 1e-4 absolute plus 1e-5 relative (the rolling totals are
    # hundreds to thousands)
    expected, got = on_cpu.loglikelihood(mc), on_device.loglikelihood(mc)
    torch.testing.assert_close(
        torch.tensor([g[0] for g in got]), torch.tensor([e[0] for e in expected]), rtol=1e-5, atol=1e-4
    )
    assert [g[1] for g in got] == [e[1] for e in expected]  # greedy flags
    assert len({round(e[0], 3) for e in expected}) > 50  # the model discriminates: the test could fail
    rolling = torch.tensor(on_device.loglikelihood_rolling(ppl))
    torch.testing.assert_close(rolling, torch.tensor(on_cpu.loglikelihood_rolling(ppl)), rtol=1e-5, atol=1e-4)
    generated = on_device.generate_until(gen)
    assert generated == on_cpu.generate_until(gen)  # greedy: the same argmax at every step
    assert sum(bool(text) for text in generated) >= len(gen) // 2  # most generate something before the newline
    assert model.training is False and on_device.model.training is False
