"""Fine-tuning from a Hugging Face checkpoint through the CLI, releases on the way, and `lit-open convert`.

The source is a tiny random-weight Llama written by `transformers` with the test corpus' tokenizer beside it, as a
hub snapshot would be; `init_from=hf:<dir>` takes the local path the hub download would have produced.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINY_LLAMA, read_metrics, run_cli, tiny_overrides

from lit_open.train.events import read_events

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_source(tiny_data, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "tiny-llama"
    config = transformers.LlamaConfig(**TINY_LLAMA)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    shutil.copy(tiny_data / "tokenizer.json", directory / "tokenizer.json")
    return directory


def finetune_args(tiny_data, run_dir, source, **extra):
    overrides = tiny_overrides(
        tiny_data, run_dir, **{"trainer.max_steps": 20, "trainer.val_check_interval": 10, **extra}
    )
    return ["train", *(o for o in overrides if not o.startswith("model.")), f"init_from=hf:{source}"]


def hf_logits(directory, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def test_finetune_a_transformers_checkpoint_release_and_convert(tiny_data, tmp_path, hf_source):
    run_dir = tmp_path / "finetune"
    release = {"plugins": "[release]", "plugins.release.every_n_steps": 10, "plugins.release.dtype": "null"}
    result = run_cli(*finetune_args(tiny_data, run_dir, hf_source, **release))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"starting from the weights of hf:{hf_source}" in result.stderr

    # the source's weights were loaded (the held-out loss at step 0 is the transformers model's), then training
    # lowered the loss
    rows = read_metrics(run_dir)
    val = [float(r["val/loss"]) for r in rows if r["val/loss"]]
    train = [float(r["train/loss"]) for r in rows if r["train/loss"]]
    assert val[-1] < val[0] - 0.3 and sum(train[-5:]) / 5 < sum(train[:5]) / 5 - 0.3
    (event,) = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "init_from"]
    assert event["kind"] == "hf" and event["optimizer_state"] == "fresh" and event["path"] == str(hf_source)
    assert f"init_from: hf:{hf_source}" in (run_dir / "config.yaml").read_text()

    # releases at steps 10 and 20: transformers loads them; metadata says what they have seen
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    released = run_dir / "hf" / "step-00000020"
    assert sorted(p.name for p in (run_dir / "hf").iterdir()) == ["step-00000010", "step-00000020"]
    meta = json.loads((released / "lit_open.json").read_text())
    assert meta["step"] == 20 and meta["tokens"] == 20 * 8 * 32 and meta["data_sequence"]["data_steps"] == [0, 20]
    assert meta["init_from"] == f"hf:{hf_source}" and "val/loss" in meta["eval"] and len(meta["config_sha256"]) == 64
    assert (released / "tokenizer.json").read_bytes() == (tiny_data / "tokenizer.json").read_bytes()
    (releases,) = [[e["path"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "release"]]
    assert releases == [str(run_dir / "hf" / "step-00000010"), str(released)]

    # convert the final resumable checkpoint: the same model as the release of step 20
    converted = tmp_path / "converted"
    result = run_cli("convert", f"source={run_dir / 'checkpoints' / 'step-00000020.ckpt'}", f"out={converted}")
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(hf_logits(converted, ids), hf_logits(released, ids), rtol=0, atol=0)
    assert not torch.allclose(hf_logits(released, ids), hf_logits(hf_source, ids), atol=1e-3)  # it did train

    # and back: Hugging Face -> lit-open weights, which init_from accepts
    weights = tmp_path / "weights.ckpt"
    assert run_cli("convert", f"source=hf:{released}", f"out={weights}").returncode == 0
    again = tmp_path / "again"
    assert run_cli("convert", f"source={weights}", f"out={again}").returncode == 0
    torch.testing.assert_close(hf_logits(again, ids), hf_logits(released, ids), rtol=0, atol=0)


def test_convert_a_checkpoint_sharded_by_two_processes(tiny_data, tmp_path, hf_source):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    steps = {"trainer.max_steps": 3, "trainer.val_check_interval": 0, "checkpoint.every_n_steps": 3}
    assert run_cli(*finetune_args(tiny_data, single, hf_source, **steps)).returncode == 0
    result = run_cli(*finetune_args(tiny_data, sharded, hf_source, strategy="fsdp", **{"trainer.devices": 2}, **steps))
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = sharded / "checkpoints" / "step-00000003.ckpt"
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2
    outs = {}
    for name, run_dir in (("single", single), ("sharded", sharded)):
        outs[name] = tmp_path / f"{name}-hf"
        source = run_dir / "checkpoints" / "step-00000003.ckpt"
        assert run_cli("convert", f"source={source}", f"out={outs[name]}").returncode == 0
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(hf_logits(outs["sharded"], ids), hf_logits(outs["single"], ids), rtol=1e-4, atol=1e-4)


def test_prepare_tokenizes_with_the_tokenizer_of_the_checkpoint_to_fine_tune(tiny_data, tmp_path, hf_source):
    import hashlib

    from lit_open.data.manifest import read_manifest

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in sorted((tiny_data.parent / "corpus").iterdir())[:3]:
        (corpus / path.name).write_text(path.read_text())
    out = tmp_path / "prepared"
    result = run_cli("prepare", f"inputs=[{corpus}]", f"output={out}", f"tokenizer=hf:{hf_source}", "val_fraction=0")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(out / "train")
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256((hf_source / "tokenizer.json").read_bytes()).hexdigest()
