"""The CLI as a user types it: listing, prepare -> train -> eval, and bad input (exit status 2, no traceback)."""

import json

import pytest
import torch
from conftest import cli_here, read_metrics, run_cli, tiny_overrides


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("lit-open: error: ")
    for fragment in fragments:
        assert fragment in message, message


def test_help_and_listing():
    result = cli_here("--help")
    assert result.returncode == 0 and "lit-open COMMAND" in result.stdout
    commands = "train, prepare, eval, convert, report, logs, data, list"
    assert_user_error(cli_here("fly"), "Unknown command 'fly'", commands)
    assert_user_error(cli_here("data"), "lit-open data needs an action: show or locate")
    assert_user_error(cli_here("data", "show", "step=two"), "step='two' must be an integer")
    assert_user_error(cli_here("data", "locate", "sample=[1]"), "sample='[1]' must be two integers")
    recipes = cli_here("list", "recipes").stdout.splitlines()
    assert [line.split()[0] for line in recipes] == [
        "amber_7b",
        "amber_7b_continue",
        "k2_65b",
        "k2_65b_long",
        "olmo2_1b",
        "olmo2_1b_midtrain",
        "olmo2_7b",
        "olmo2_7b_long",
        "pythia_160m",
        "pythia_160m_finetune",
        "quickstart",
    ]
    models = {line.split()[0]: line for line in cli_here("list", "models").stdout.splitlines()}
    assert "1.48B" in models["olmo2_1b"] and "162.3M" in models["pythia_160m"] and "65.29B" in models["k2_65b"]
    assert cli_here("list", "plugins").returncode == 0
    assert_user_error(cli_here("list", "things"), "lit-open list recipes|models|plugins")


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["recipe=olmo9"], ["Unknown recipe 'olmo9'", "quickstart"]),
        (["model=gpt5"], ["Unknown model preset 'gpt5'", "olmo2_1b"]),
        (["optim.lrr=0.1"], ["Unknown config key 'optim.lrr'", "weight_decay"]),
        (["trainer.max_steps=many"], ["trainer.max_steps", "'many'", "int"]),
        (["data.prepare=null", "data.sources=[{path:/nowhere/train}]"], ["/nowhere/train", "lit-open prepare"]),
    ],
)
def test_bad_configuration_exits_2_before_training(args, fragments, tmp_path):
    assert_user_error(cli_here("train", f"run.dir={tmp_path / 'run'}", *args), *fragments)


def test_unwritable_run_directory_exits_2(tiny_data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = cli_here("train", *tiny_overrides(tiny_data, blocker / "run"))
    assert_user_error(result, "is not writable", "run.dir=PATH")


@pytest.mark.slow
def test_prepare_train_eval_and_checkpoint_errors(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = "the model reads tokens and predicts the next one while the loss falls step by step".split()
    rng = torch.Generator().manual_seed(0)
    with open(corpus / "docs.jsonl", "w") as f:
        for _ in range(400):
            idx = torch.randint(len(words), (60,), generator=rng).tolist()
            f.write(json.dumps({"text": " ".join(words[i] for i in idx)}) + "\n")
    (corpus / "notes.txt").write_text("plain text documents count as one document each\n" * 50)
    data = tmp_path / "prepared"
    prep = run_cli("prepare", f"inputs=[{corpus}]", f"output={data}", "vocab_size=300", "val_fraction=0.2")
    assert prep.returncode == 0, prep.stderr
    manifest = json.loads((data / "train" / "manifest.json").read_text())
    assert manifest["tokens"] > 10_000 and manifest["tokenizer"]["vocab_size"] == 300

    run_dir = tmp_path / "run"
    overrides = tiny_overrides(data, run_dir, **{"model.vocab_size": 300})
    trained = run_cli("train", *overrides)
    assert trained.returncode == 0, trained.stderr
    assert "Done: 6 steps" in trained.stderr and "lit-open eval checkpoint=" in trained.stderr

    # eval scores the same held-out samples as the in-training validation at the same step
    last = run_dir / "checkpoints" / "step-00000006.ckpt"
    evaluated = run_cli("eval", f"checkpoint={last}")
    assert evaluated.returncode == 0, evaluated.stderr
    val = [float(r["val/loss"]) for r in read_metrics(run_dir) if r["step"] == "6" and r["val/loss"]][0]
    reported = float(evaluated.stderr.split("held-out loss ")[1].split(",")[0])
    assert reported == pytest.approx(val, abs=1e-4)
    assert_user_error(cli_here("eval"), "checkpoint=PATH")
    assert_user_error(cli_here("eval", f"checkpoint={tmp_path / 'nope.ckpt'}"), "no such file")

    # a checkpoint of another architecture
    assert_user_error(
        cli_here("train", *overrides, "model.n_layer=3", "trainer.max_steps=9"),
        "another model",
        "model.n_layer: 2 in the checkpoint, 3 now",
    )
    # a truncated (partial) newest checkpoint: named, with the older one offered
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    assert_user_error(
        cli_here("train", *overrides, "trainer.max_steps=9"),
        "Cannot read checkpoint",
        "step-00000006.ckpt",
        "resume=",
        "step-00000003.ckpt",
    )
    # an explicit resume path that is garbage
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    assert_user_error(cli_here("train", *overrides, f"resume={junk}"), "Cannot read checkpoint", "junk.ckpt")


@pytest.mark.slow
def test_debug_keeps_exit_status_2_and_shows_the_traceback_with_its_cause(tmp_path):
    # a user error raised from a library's exception: a Hugging Face directory whose weights file is garbage
    transformers = pytest.importorskip("transformers")
    source = tmp_path / "hf"
    source.mkdir()
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    config.save_pretrained(source)
    (source / "model.safetensors").write_bytes(b"not safetensors")
    result = run_cli("convert", f"source=hf:{source}", f"out={tmp_path / 'w.ckpt'}", env={"LIT_OPEN_DEBUG": "1"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback (most recent call last)" in result.stderr
    assert "The above exception was the direct cause of the following exception" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("lit-open: error: Could not read the weights file")
