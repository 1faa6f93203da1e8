"""`lit-open eval`: score a checkpoint on held-out data (loss and perplexity) or on lm-eval benchmarks.

`lit-open eval checkpoint=RUN_CKPT` gives the held-out loss of a run checkpoint on its run's validation sources.
`lit-open eval checkpoint=SOURCE tasks=[...]` runs lm-eval tasks (names or local task directories) through the
adapter the in-loop `lm_eval` plugin uses, so its numbers equal the plugin's at that step: SOURCE is a run
checkpoint (single-file `.ckpt` or sharded directory) or a Hugging Face directory (`hf:/dir`, or a directory with
config.json).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from lit_open.checkpoint.resumable import read_checkpoint
from lit_open.compose import load_train_config
from lit_open.data.datamodule import DataModule
from lit_open.errors import UserError
from lit_open.module import CHECKPOINT_KEY, LitLM
from lit_open.plugin import build_plugins
from lit_open.train import build_strategy, console, ensure_data, release_process_group


def evaluate(checkpoint: str | Path, overrides: list[str]) -> dict[str, Any]:
    """Held-out loss of `checkpoint` on the validation sources of its run (or those given in overrides)."""
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint={str(checkpoint)!r}: no such file. Give a checkpoint from <run.dir>/checkpoints/.")
    if (path / "config.json").is_file():
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
    module = LitLM(cfg, build_plugins(cfg.plugins))
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        # a sharded checkpoint loads into a sharded model, here of one shard
        strategy=build_strategy("fsdp" if path.is_dir() else "auto", 1, 1),
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
    loss = module.last_metrics["val/loss"]
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


TASK_OPTIONS = ("tasks", "limit", "batch_size", "num_fewshot", "max_gen_tokens", "tokenizer", "out")


def evaluate_tasks(checkpoint: str, args: list[str]) -> dict[str, Any]:
    """lm-eval `tasks=[...]` on a run checkpoint or a Hugging Face directory, as the lm_eval plugin scores them.

    args: tasks=[a,b] and optionally limit=N, batch_size=N, num_fewshot=N, max_gen_tokens=N, tokenizer=PATH (the
    tokenizer.json, default: the run's or the directory's), out=FILE (the results as JSON).
    """
    from lit_open.eval.harness import PREPARED, LitOpenLM, load_tasks, resolve_tasks, run_tasks, tokenizer_and_eos

    options = _task_options(args)
    given_now = [t for t in options["tasks"] if not str(t).startswith(PREPARED)]
    if given_now:
        resolve_tasks(given_now, "tasks")  # a mistake in them shows before the model loads
    model, step, tokenizer_dir = _load_model(checkpoint)
    if torch.cuda.is_available():
        model = model.to("cuda")
    tokenizer_path = options.get("tokenizer") or tokenizer_dir
    if tokenizer_path is None:
        raise UserError(
            f"No tokenizer found for checkpoint={checkpoint}: give tokenizer=PATH (the tokenizer.json the model was "
            "trained with)."
        )
    tokenizer, eos_id = tokenizer_and_eos(tokenizer_path)
    data_dir = Path(tokenizer_path) if Path(tokenizer_path).is_dir() else Path(tokenizer_path).parent
    task_dict = load_tasks(resolve_tasks(options["tasks"], "tasks", data_dir), options.get("num_fewshot"))
    lm = LitOpenLM(
        model,
        tokenizer,
        eos_id,
        batch_size=options.get("batch_size", 8),
        max_gen_tokens=options.get("max_gen_tokens", 32),
    )
    outcome = run_tasks(lm, task_dict, options.get("limit"))
    result = {"checkpoint": str(checkpoint), "step": step, "metrics": outcome.metrics, "seconds": outcome.seconds}
    for key, value in outcome.metrics.items():
        console.print(f"{key:<48} {value:.6g}")
    console.print(f"{checkpoint} (step {step}): {len(task_dict['tasks'])} task(s) in {outcome.seconds:.1f} s")
    if options.get("out"):
        out = Path(options["out"]).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**result, "lm_eval": outcome.results}, indent=2, default=str) + "\n")
    return result


def _task_options(args: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in TASK_OPTIONS:
            raise UserError(
                f"lit-open eval: {arg!r} is not an option with tasks=. Give checkpoint=PATH tasks=[NAME_OR_DIR,...] "
                "[limit=N] [batch_size=N] [num_fewshot=N] [max_gen_tokens=N] [tokenizer=TOKENIZER_JSON] [out=FILE]."
            )
        if key == "tasks":
            options[key] = [
                t.strip() for t in value.strip().removeprefix("[").removesuffix("]").split(",") if t.strip()
            ]
        elif key in ("tokenizer", "out"):
            options[key] = value
        elif value == "null" and key in ("limit", "num_fewshot"):
            options[key] = None
        else:
            try:
                options[key] = int(value)
            except ValueError:
                raise UserError(f"lit-open eval: {key}={value!r} must be a whole number.") from None
            if options[key] < (0 if key == "num_fewshot" else 1):
                raise UserError(f"lit-open eval: {key}={value} must be {'0' if key == 'num_fewshot' else '1'} or more.")
    return options


def _load_model(checkpoint: str) -> tuple[Any, int | None, Path | None]:
    """The Transformer of a run checkpoint or a Hugging Face directory (on the CPU, in eval mode), its step (None
    when unknown) and the directory of its tokenizer (None when not found)."""
    from lit_open.checkpoint.source import open_source, read_weights
    from lit_open.convert import run_tokenizer_dir
    from lit_open.model import Transformer

    source = open_source(checkpoint)
    if source.kind == "hf":
        from lit_open.checkpoint.hf import load_hf

        metadata = source.path / "lit_open.json"
        step = json.loads(metadata.read_text()).get("step") if metadata.is_file() else None
        tokenizer = source.tokenizer.parent if source.tokenizer is not None else None
        return load_hf(source.path), step, tokenizer
    saved = read_checkpoint(source.path)
    step, run_config = saved["global_step"], saved[CHECKPOINT_KEY].get("config", {})
    del saved
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
        ) from None
    return model, step, run_tokenizer_dir(run_config)
