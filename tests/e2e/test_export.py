"""Exports and evaluations keep the data's tokenizer, as a user runs them: `lit-open convert` ships the tokenizer the
run's data was prepared with (and a tokenizer_config.json that transformers and lm-eval read as is), refuses a
tokenizer that is not the data's and never replaces an existing output unasked, `lit-open eval` refuses held-out
data of another tokenizer, and both commands say which checkpoint to give when handed a directory of them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat

import pytest
import torch
from conftest import cli_here, run_cli, tiny_overrides

from lit_open.config import PrepareConfig
from lit_open.data.prepare import prepare

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def user_error(result, *fragments) -> str:
    assert result.returncode == 2, result.stdout + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("lit-open: error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert str(fragment) in message, message
    return message


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    """A tiny run on tiny_data (checkpoints at steps 3 and 6)."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    result = run_cli("train", *tiny_overrides(tiny_data, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def other_data(tiny_data, tmp_path_factory):
    """Some of the same corpus prepared with another tokenizer (a 300-token BPE), with a held-out split."""
    root = tmp_path_factory.mktemp("other-data")
    corpus = root / "corpus.jsonl"
    with corpus.open("w") as f:
        for path in sorted((tiny_data.parent / "corpus").iterdir())[:6]:
            for i, part in enumerate(path.read_text().split("\n\n")[:20]):
                f.write(json.dumps({"text": f"{path.name} {i}\n{part}"}) + "\n")
    cfg = PrepareConfig(inputs=[str(corpus)], output=str(root / "prepared"), vocab_size=300, val_fraction=0.3)
    return prepare(cfg)


def test_convert_ships_the_data_tokenizer_that_transformers_reads_as_is(run, tiny_data, tmp_path):
    export = tmp_path / "hf"
    result = run_cli("convert", f"source={run / 'checkpoints' / 'step-00000006.ckpt'}", f"out={export}")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tiny_data / "train" / "manifest.json").read_text())
    assert sha256(export / "tokenizer.json") == manifest["tokenizer"]["sha256"]

    # tokenizer_config.json names the data's end-of-document token: AutoTokenizer needs nothing else
    config = json.loads((export / "tokenizer_config.json").read_text())
    assert config["eos_token"] == manifest["tokenizer"]["eos_token"] == "<|endoftext|>"
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["model_max_length"] == 64
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == manifest["tokenizer"]["eos_id"]
    text = "def main(argv):\n    return 0\n"
    from tokenizers import Tokenizer

    assert tokenizer(text)["input_ids"] == Tokenizer.from_file(str(tiny_data / "tokenizer.json")).encode(text).ids
    assert json.loads((export / "config.json").read_text())["eos_token_id"] == manifest["tokenizer"]["eos_id"]

    # the files are readable by others as any file written by the user (safetensors creates its files 0600)
    umask = os.umask(0)
    os.umask(umask)
    for path in export.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name

    # lm-eval's Hugging Face runner takes the export as is (lm_eval --model hf --model_args pretrained=DIR)
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(export), device="cpu", dtype="float32", batch_size=2)
    assert lm.eot_token_id == lm.prefix_token_id == manifest["tokenizer"]["eos_id"] and lm.max_length == 64
    assert lm.tok_encode(text) == tokenizer(text)["input_ids"]


def test_convert_refuses_a_tokenizer_that_is_not_the_datas(run, tiny_data, other_data, tmp_path):
    checkpoint = run / "checkpoints" / "step-00000006.ckpt"
    other = other_data / "tokenizer.json"
    data_manifest, data_tokenizer = tiny_data / "train" / "manifest.json", tiny_data / "tokenizer.json"
    data_sha = json.loads(data_manifest.read_text())["tokenizer"]["sha256"]

    # a run whose data.tokenizer is not its data's (the quickstart recipe's, kept while training on other data)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    saved["lit_open"]["config"]["data"]["tokenizer"] = str(other)
    mismatched = tmp_path / "step-00000006.ckpt"
    torch.save(saved, mismatched)
    out = tmp_path / "hf"
    result = cli_here("convert", f"source={mismatched}", f"out={out}")
    user_error(
        result, other, sha256(other), data_manifest, data_sha, "given by data.tokenizer;", f"tokenizer={data_tokenizer}"
    )
    assert not out.exists()

    # an explicit tokenizer= that is not the data's
    result = cli_here("convert", f"source={checkpoint}", f"out={out}", f"tokenizer={other}")
    user_error(
        result, other, sha256(other), data_manifest, data_sha, "given by tokenizer;", f"tokenizer={data_tokenizer}"
    )
    assert not out.exists()


def test_eval_refuses_held_out_data_of_another_tokenizer(run, tiny_data, other_data):
    checkpoint = run / "checkpoints" / "step-00000006.ckpt"
    other_manifest = other_data / "val" / "manifest.json"
    result = run_cli("eval", f"checkpoint={checkpoint}", f"data.val_sources=[{{path:{other_data / 'val'}}}]")
    message = user_error(
        result,
        tiny_data / "tokenizer.json",
        sha256(tiny_data / "tokenizer.json"),
        other_manifest,
        json.loads(other_manifest.read_text())["tokenizer"]["sha256"],
        "data.val_sources",
    )
    assert "lit-open prepare" in message


def test_a_directory_of_checkpoints_is_answered_with_the_checkpoints_in_it(run):
    newest, older = run / "checkpoints" / "step-00000006.ckpt", run / "checkpoints" / "step-00000003.ckpt"
    for given in (run / "checkpoints", run):
        message = user_error(cli_here("eval", f"checkpoint={given}"), f"checkpoint={newest}", "latest")
        assert message.index(newest.name) < message.index(older.name)  # the newest first
        user_error(cli_here("eval", f"checkpoint={given}", "tasks=[prepared:next_line]"), f"checkpoint={newest}")
        user_error(cli_here("convert", f"source={given}", "out=unused"), f"source={newest}", older.name)


def test_convert_refuses_an_existing_out_unless_overwrite(run, tmp_path):
    checkpoint = run / "checkpoints" / "step-00000003.ckpt"
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    user_error(cli_here("convert", f"source={checkpoint}", f"out={out}"), out, "overwrite=true")
    assert (out / "notes.txt").read_text() == "mine"
    weights = tmp_path / "weights.ckpt"
    weights.write_text("mine")
    user_error(cli_here("convert", f"source=hf:{out}", f"out={weights}"), weights, "overwrite=true")
    assert weights.read_text() == "mine"

    assert cli_here("convert", f"source={checkpoint}", f"out={out}", "overwrite=true").returncode == 0
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()
    result = cli_here("convert", f"source=hf:{out}", f"out={weights}", "overwrite=true")
    assert result.returncode == 0, result.stderr
    assert torch.load(weights, weights_only=False)["global_step"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "weights.ckpt"]  # no temporary siblings left
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_here("convert", f"source={checkpoint}", f"out={empty}").returncode == 0  # an empty directory is fine
    shutil.rmtree(empty)


def test_training_refuses_a_tokenizer_that_is_not_the_datas(tiny_data, other_data, tmp_path):
    """A recipe's data.tokenizer kept beside your own data.sources: refused at start-up, naming both files and
    hashes, before anything is trained or written."""
    other = other_data / "tokenizer.json"
    result = cli_here("train", *tiny_overrides(tiny_data, tmp_path / "run", **{"data.tokenizer": other}))
    data_hash = sha256(tiny_data / "tokenizer.json")
    user_error(result, other, sha256(other), tiny_data / "train" / "manifest.json", data_hash)
    assert not (tmp_path / "run" / "config.yaml").exists()
    # held-out data of another tokenizer beside the right training data is refused too
    val = {"data.val_sources": f"[{{path:{other_data}/val}}]"}
    result = cli_here("train", *tiny_overrides(tiny_data, tmp_path / "run", **val))
    user_error(result, other_data / "val" / "manifest.json")
