"""`lit-open eval`: score a checkpoint on held-out data (loss and perplexity) or on lm-eval benchmarks.

`lit-open eval checkpoint=RUN_CKPT` gives the held-out loss of a run checkpoint on its run's validation sources.
`lit-open eval checkpoint=SOURCE tasks=[...]` runs lm-eval tasks (names or local task directories) through the
adapter the in-loop `lm_eval` plugin uses, so its numbers equal the plugin's at that step: SOURCE is a run
checkpoint (single-file `.ckpt` or sharded directory) or a Hugging Face directory (`hf:/dir`, or a directory with
config.json).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from lit_open.checkpoint.hf import METADATA_FILE, load_hf
from lit_open.checkpoint.hub import CONFIG_FILE
from lit_open.checkpoint.resumable import CHECKPOINT_KEY, read_checkpoint
from lit_open.checkpoint.source import check_checkpoint_spec, open_source, read_weights
from lit_open.compose import load_command_config, load_train_config
from lit_open.config import EvalConfig
from lit_open.data.datamodule import DataModule
from lit_open.data.tokenizer import (
    check_tokenizer_matches,
    data_tokenizer_file,
    prepared_sources,
    tokenizer_and_eos,
    tokenizer_file,
)
from lit_open.errors import UserError
from lit_open.model import Transformer
from lit_open.plugin import build_plugins
from lit_open.train.module import LitLM
from lit_open.train.runner import build_strategy, ensure_data, release_process_group
from lit_open.train.summary import console

EVAL_OPTIONS = {f.name for f in dataclasses.fields(EvalConfig)}


def eval_command(args: list[str]) -> dict[str, Any]:
    """`lit-open eval checkpoint=... [options]`: lm-eval tasks with tasks=[...], else the held-out loss; the other
    `key=value` arguments of a held-out evaluation override the checkpoint's run config (e.g. data.val_sources)."""
    options = [a for a in args if a.lstrip("+").partition("=")[0] in EVAL_OPTIONS]
    run_overrides = [a for a in args if a not in options]
    if not any(a.partition("=")[0] == "checkpoint" for a in options):
        raise UserError(
            "lit-open eval needs checkpoint=PATH (a file in <run.dir>/checkpoints/, or with tasks=[...] also a "
            "Hugging Face directory)."
        )
    cfg = load_command_config("eval", options)
    check_checkpoint_spec(cfg.checkpoint, "checkpoint")
    if cfg.tasks is None:
        return evaluate(cfg.checkpoint, run_overrides)
    if run_overrides:
        raise UserError(
            f"lit-open eval with tasks=[...] takes the options {', '.join(sorted(EVAL_OPTIONS))}; "
            f"{run_overrides[0]!r} is not one of them."
        )
    return evaluate_tasks(cfg)


def evaluate(checkpoint: str | Path, overrides: list[str]) -> dict[str, Any]:
    """Held-out loss of `checkpoint` on the validation sources of its run (or those given in overrides)."""
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint={str(checkpoint)!r}: no such file. Give a checkpoint from <run.dir>/checkpoints/.")
    if (path / CONFIG_FILE).is_file():
        raise UserError(
            f"checkpoint={str(checkpoint)!r} is a Hugging Face directory, which has no held-out data of its own: "
            "give tasks=[...] to benchmark it with lm-eval, or a run checkpoint for the held-out loss."
        )
    saved = read_checkpoint(path)
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "config.yaml"
        config_file.write_text(OmegaConf.to_yaml(OmegaConf.create(saved[CHECKPOINT_KEY]["config"])))
        cfg = load_train_config(overrides, config_file=config_file)
    step = saved["global_step"]
    del saved
    if not cfg.data.val_sources:
        raise UserError(
            "This run has no held-out data (data.val_sources is empty): give some, e.g. "
            "data.val_sources=[{path:/data/mine/val}] (written by `lit-open prepare` with val_fraction>0)."
        )
    ensure_data(cfg, rank_zero=True, need_train=False)
    tokenizer = data_tokenizer_file(dataclasses.asdict(cfg))
    if tokenizer is not None:  # the model's: a held-out loss on data tokenized otherwise would mean nothing
        check_tokenizer_matches(
            tokenizer,
            [s.path for s in cfg.data.val_sources if s.format == "litdata"],  # released formats: no manifest
            "data.tokenizer",
            "The model was trained on tokens of this tokenizer: give data.val_sources held-out data prepared with "
            f"it, e.g. `lit-open prepare inputs=[...] output=DIR tokenizer={tokenizer} val_fraction=0.1` and "
            "data.val_sources=[{path:DIR/val}].",
        )
    module = LitLM(cfg, build_plugins(cfg.plugins))
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        # a sharded checkpoint loads into a sharded model, here of one shard
        strategy=build_strategy("fsdp" if path.is_dir() else "auto", 1, 1, 1),
        precision=cfg.trainer.precision,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        use_distributed_sampler=False,
        callbacks=module.plugins,  # their saved state may be part of the computation (qk_norm's blend factor)
    )
    try:
        trainer.validate(module, datamodule=DataModule(cfg.data, cfg.run.seed), ckpt_path=path, verbose=False)
    finally:
        release_process_group()
    loss = module.run.last_metrics["val/loss"]
    result = {
        "checkpoint": str(path),
        "step": step,
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 50.0)),
        "val_samples": cfg.data.val_samples,
        "seq_len": cfg.data.seq_len,
    }
    console.print(
        f"{path} (step {step}): held-out loss {loss:.4f}, perplexity {result['val_ppl']:.2f} "
        f"over up to {cfg.data.val_samples} sequences of {cfg.data.seq_len} tokens"
    )
    return result


def evaluate_tasks(cfg: EvalConfig) -> dict[str, Any]:
    """lm-eval `cfg.tasks` on a run checkpoint or a Hugging Face directory, as the lm_eval plugin scores them."""
    # imported here: lm-eval's task registry and evaluator take seconds to import, and only this mode needs them
    from lit_open.eval.harness import PREPARED, LitOpenLM, load_tasks, resolve_tasks, run_tasks

    for key in ("limit", "batch_size", "max_gen_tokens"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise UserError(f"lit-open eval: {key}={getattr(cfg, key)} must be 1 or more.")
    if cfg.num_fewshot is not None and cfg.num_fewshot < 0:
        raise UserError(f"lit-open eval: num_fewshot={cfg.num_fewshot} must be 0 or more.")
    given_now = [t for t in cfg.tasks if not str(t).startswith(PREPARED)]
    if given_now:
        resolve_tasks(given_now, "tasks")  # a mistake in them shows before the model loads
    model, step, tokenizer_path = _load_model(cfg.checkpoint, cfg.tokenizer)
    if torch.cuda.is_available():
        model = model.to("cuda")
    if tokenizer_path is None:
        raise UserError(
            f"No tokenizer found for checkpoint={cfg.checkpoint}: give tokenizer=PATH (the tokenizer.json the model "
            "was trained with)."
        )
    tokenizer, eos_id = tokenizer_and_eos(tokenizer_path)
    task_dict = load_tasks(resolve_tasks(cfg.tasks, "tasks", tokenizer_path.parent), cfg.num_fewshot)
    lm = LitOpenLM(model, tokenizer, eos_id, batch_size=cfg.batch_size, max_gen_tokens=cfg.max_gen_tokens)
    outcome = run_tasks(lm, task_dict, cfg.limit)
    result = {"checkpoint": cfg.checkpoint, "step": step, "metrics": outcome.metrics, "seconds": outcome.seconds}
    for key, value in outcome.metrics.items():
        console.print(f"{key:<48} {value:.6g}")
    console.print(f"{cfg.checkpoint} (step {step}): {len(task_dict['tasks'])} task(s) in {outcome.seconds:.1f} s")
    if cfg.out:
        out = Path(cfg.out).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**result, "lm_eval": outcome.results}, indent=2, default=str) + "\n")
    return result


def _load_model(checkpoint: str, tokenizer: str | None) -> tuple[Any, int | None, Path | None]:
    """The Transformer of a run checkpoint or a Hugging Face directory (on the CPU, in eval mode), its step (None
    when unknown) and its tokenizer.json (None when not found): `tokenizer` if given, else the HF directory's or the
    one the run's training data was prepared with; for a run checkpoint it must be the data's (its manifests)."""
    source = open_source(checkpoint)
    if source.kind == "hf":
        metadata = source.path / METADATA_FILE
        step = json.loads(metadata.read_text()).get("step") if metadata.is_file() else None
        return load_hf(source.path), step, tokenizer_file(tokenizer) if tokenizer else source.tokenizer
    saved = read_checkpoint(source.path)
    step, run_config = saved["global_step"], saved[CHECKPOINT_KEY].get("config", {})
    del saved
    fix = "The model was trained on that data: give tokenizer= the tokenizer.json it was prepared with."
    if tokenizer:
        tokenizer_path = tokenizer_file(tokenizer)
        check_tokenizer_matches(tokenizer_path, prepared_sources(run_config), "tokenizer", fix)
    else:
        tokenizer_path = data_tokenizer_file(run_config, fix)
    state, _ = read_weights(source)
    with torch.device("meta"):
        model = Transformer(source.model)
    try:
        model.assign_weights(state)
    except RuntimeError as err:
        raise UserError(
            f"checkpoint={checkpoint}: its weights do not fit the architecture in its config ({str(err)[:300]}); "
            "a plugin may have changed the architecture (qk_norm, ...): export it with the release plugin and "
            "evaluate the Hugging Face directory."
        ) from err
    return model, step, tokenizer_path
