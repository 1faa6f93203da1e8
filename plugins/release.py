"""release: export the model as a Hugging Face checkpoint every N steps or N tokens, LLM360-style.

What: at every `every_n_steps`-th optimizer step, and/or each time the tokens seen cross a multiple of
`every_n_tokens` (and at the end of training when `at_end`), the model is written as a Hugging Face directory
(`config.json`, safetensors, the tokenizer files) to `<run.dir>/hf/step-NNNNNNNN/`, which `transformers` loads as
it is and `init_from=hf:<dir>` fine-tunes from. Each directory also holds `lit_open.json`:
- step, tokens (seen so far), data_sequence (`[first, end)` data steps consumed and where the log of their samples
  is: together they say exactly which data the checkpoint has seen),
- config_sha256 (of the run's resolved config) and the config itself,
- eval: the latest held-out loss / perplexity and any other `val/` or `eval/` values logged so far,
- init_from (the run's starting point, if any), rollbacks and skipped updates so far.
A `release` event in events.jsonl names each export. Sharded models (fsdp/tp) are gathered to global rank 0,
which writes; a directory appears complete or not at all.

Why: "truly open" runs publish their intermediate checkpoints with the data each has seen (LLM360 releases 360
checkpoints of Amber, Pythia 154); resumable checkpoints, with optimizer state, are another thing with their own
retention (`checkpoint.keep_last` plus `checkpoint.keep_every`).

Options (`plugins.release.<option>`):
- every_n_steps (int, default 1000; 0: off), every_n_tokens (int, default 0: off): when to export.
- at_end (bool, default true): also export the final model.
- dtype (float32 | bfloat16 | float16 | null, default bfloat16): the weights' dtype in the export (null: as trained).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lit_open.convert import DTYPES, run_tokenizer_dir
from lit_open.errors import UserError
from lit_open.plugin import Plugin
from lit_open.state import full_state_dict


class Release(Plugin):
    """Writes `<run.dir>/hf/step-NNNNNNNN/` Hugging Face exports with metadata at a step or token interval."""

    name = "release"

    @dataclass
    class Config:
        every_n_steps: int = 1000
        every_n_tokens: int = 0
        at_end: bool = True
        dtype: str | None = "bfloat16"

        def __post_init__(self) -> None:
            for key in ("every_n_steps", "every_n_tokens"):
                if getattr(self, key) < 0:
                    raise UserError(f"plugins.release.{key}={getattr(self, key)} must be 0 (off) or positive.")
            if not (self.every_n_steps or self.every_n_tokens or self.at_end):
                raise UserError(
                    "plugins.release exports nothing with every_n_steps=0, every_n_tokens=0 and at_end=false: "
                    "set one of them."
                )
            if self.dtype is not None and self.dtype not in DTYPES:
                raise UserError(
                    f"plugins.release.dtype={self.dtype!r} is not supported; choose {', '.join(DTYPES)} or null "
                    "(the dtype the model trains in)."
                )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._last_step = -1  # the step exported last (or the one training started from)
        self.released: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        from lit_open.checkpoint.hf import hf_config

        self._last_step = trainer.global_step
        try:  # fail before training, not at the first export, when no Hugging Face layout describes the model
            hf_config(pl_module.model.config)
        except UserError as err:
            raise UserError(f"plugins.release cannot export this model: {err}") from None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step or batch["micro"] + 1 != batch["n_micro"]:
            return
        tokens_per_step = pl_module.tokens_per_batch
        due = bool(self.cfg.every_n_steps) and step % self.cfg.every_n_steps == 0
        if self.cfg.every_n_tokens:
            seen = pl_module.consumed_batches * tokens_per_step
            due = due or seen // self.cfg.every_n_tokens > (seen - tokens_per_step) // self.cfg.every_n_tokens
        if due:
            self.export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.cfg.at_end and trainer.global_step != self._last_step:
            self.export(trainer, pl_module)

    def export(self, trainer, pl_module) -> Path:
        """Gather the weights on rank 0 and write the Hugging Face directory (every rank must call this)."""
        from lit_open.checkpoint.hf import save_hf

        step = trainer.global_step
        self._last_step = step
        state = full_state_dict(pl_module.model)
        out = Path(trainer.default_root_dir) / "hf" / f"step-{step:08d}"
        if trainer.is_global_zero:
            started = time.perf_counter()
            config = pl_module.config
            save_hf(
                state,
                out,
                config=pl_module.model.config,  # the architecture as built (plugins may have changed it)
                tokenizer_dir=run_tokenizer_dir(asdict(config)),
                metadata=self.metadata(trainer, pl_module),
                dtype=DTYPES[self.cfg.dtype] if self.cfg.dtype else None,
            )
            self.released.append(step)
            seconds = time.perf_counter() - started
            self.log_event(trainer, pl_module, "release", path=str(out), seconds=round(seconds, 2))
        trainer.strategy.barrier("lit_open_release")
        return out

    def metadata(self, trainer, pl_module) -> dict[str, Any]:
        config = asdict(pl_module.config)
        text = json.dumps(config, sort_keys=True, default=str)
        evals = {k: v for k, v in pl_module.last_metrics.items() if k.startswith(("val/", "eval/"))}
        return {
            "format": "lit-open-release/1",
            "step": trainer.global_step,
            "tokens": pl_module.consumed_batches * pl_module.tokens_per_batch,
            "data_sequence": {
                "data_steps": [0, pl_module.consumed_batches],
                "log": str(Path(trainer.default_root_dir) / "data_sequence"),
            },
            "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "eval": evals,
            "init_from": pl_module.config.init_from,
            "rollbacks": pl_module.rollbacks,
            "skipped_updates": pl_module.skipped_updates,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": config,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"released": list(self.released)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.released = list(state["released"])
