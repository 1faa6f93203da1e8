"""lm-eval on a sharded model in 2 gloo processes gives the numbers of the whole model in one process.

FSDP2 (2 data-parallel ranks: requests split between them) and tensor parallelism (2 peers scoring the same
requests), on the adapter directly and through `lit-open train plugins=[lm_eval]` under Lightning's strategies.
Document counts are odd and rolling windows and generated lengths differ per document, so the ranks have unequal
work: the adapter must keep their forward passes in step or the collectives inside them hang.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_gloo
from lm_eval_tasks import TINY_CONFIG, write_local_tasks
from strategy_runs import STEPS

from lit_open.config import StrategyConfig
from lit_open.data.tokenizer import tokenizer_and_eos
from lit_open.eval.harness import LitOpenLM, load_tasks, resolve_tasks, run_tasks
from lit_open.model import Transformer
from lit_open.parallel import materialize, parallelize

pytestmark = pytest.mark.slow

MESHES = {"fsdp": (2, 1), "tp": (1, 2)}


def reference_model(seed: int = 0) -> Transformer:
    model = Transformer(TINY_CONFIG)
    model.init_weights(seed=seed)
    with torch.no_grad():  # larger logits than at init, so that answers differ between documents
        model.output.weight.mul_(20)
    return model.eval()


def worker(strategy: str, state_path: str, tasks: str, tokenizer_json: str, expected_path: str, out: str) -> None:
    import faulthandler

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    faulthandler.dump_traceback_later(300, exit=True)  # mismatched collectives fail the test instead of hanging it
    mesh = init_device_mesh("cpu", MESHES[strategy], mesh_dim_names=("data_parallel", "tensor_parallel"))
    with torch.device("meta"):
        model = Transformer(TINY_CONFIG)
    materialize(parallelize(model, StrategyConfig(name=strategy), mesh), torch.device("cpu"), seed=1)
    whole = torch.load(state_path)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(distribute_tensor(whole[name], param.device_mesh, param.placements))
    tokenizer, eos = tokenizer_and_eos(tokenizer_json)
    lm = LitOpenLM(
        model,
        tokenizer,
        eos,
        batch_size=3,
        data_parallel=mesh["data_parallel"].get_group(),
        tensor_parallel_size=mesh["tensor_parallel"].size(),
    )
    assert (lm.rank, lm.world_size) == (mesh["data_parallel"].get_local_rank(), MESHES[strategy][0])
    outcome = run_tasks(lm, load_tasks(resolve_tasks([tasks])))
    idle = torch.tensor([lm._forward.idle_passes])
    dist.all_reduce(idle)
    assert idle.item() > 0 if strategy == "fsdp" else idle.item() == 0  # unequal work between data-parallel ranks
    if lm.rank != 0:
        assert outcome.metrics == {}
        return
    expected = json.loads(Path(expected_path).read_text())
    assert outcome.metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert math.isclose(outcome.metrics[key], value, rel_tol=1e-5, abs_tol=1e-9), (strategy, key)
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(outcome.metrics))


@pytest.mark.parametrize("strategy", sorted(MESHES))
def test_sharded_model_scores_like_the_whole_model(strategy, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))  # inherited by the processes
    tasks = write_local_tasks(tiny_data.parent / "corpus", tmp_path / "tasks", docs=9, generation=True)
    model = reference_model()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    tokenizer, eos = tokenizer_and_eos(tiny_data / "tokenizer.json")
    expected = run_tasks(LitOpenLM(model, tokenizer, eos, batch_size=3), load_tasks(resolve_tasks([str(tasks)])))
    assert len(set(expected.metrics.values())) > 3
    (tmp_path / "expected.json").write_text(json.dumps(expected.metrics))
    args = (str(tmp_path / "model.pt"), str(tasks), str(tiny_data / "tokenizer.json"), str(tmp_path / "expected.json"))
    run_gloo(worker, strategy, *args, str(tmp_path))
    reporters = sorted(p.name for p in tmp_path.glob("rank*.json"))
    assert reporters == (["rank0.json"] if strategy == "fsdp" else ["rank0.json", "rank1.json"])


@pytest.mark.parametrize("setup", ["ddp2", "fsdp2", "fsdp1", "tp2", "fsdp_tp4"])
def test_in_loop_eval_under_lightning_strategies_matches_one_process(strategy_runs, setup):
    """`lit-open train plugins=[lm_eval]` under each strategy (tests/strategy_runs.py) logs the single-process
    numbers at the end of training."""
    results = {}
    for name in ("single", setup):
        (row,) = [r for r in read_metrics(strategy_runs[name]) if r.get("eval/next_line/acc")]
        assert int(row["step"]) == STEPS
        results[name] = {k: float(v) for k, v in row.items() if k.startswith("eval/") and v}
    assert len(results["single"]) >= 5
    assert results[setup].keys() == results["single"].keys()
    for key, value in results["single"].items():
        assert math.isclose(results[setup][key], value, rel_tol=1e-4, abs_tol=1e-9), key
