"""release: every N steps or tokens (and at the end) the model as a Hugging Face directory in
`<run.dir>/hf/step-NNNNNNNN/`, with `lit_open.json` saying which data it has seen, LLM360-style. Design, metadata and
options: docs/plugins/release.md; `lit-open list plugins` shows the options and their defaults.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lit_open.checkpoint.hf import save_hf
from lit_open.checkpoint.hf_config import hf_config
from lit_open.data.tokenizer import run_tokenizer_dir
from lit_open.dtypes import torch_dtype
from lit_open.errors import UserError
from lit_open.parallel import full_state_dict
from lit_open.plugin import Plugin, option


class Release(Plugin):
    """Writes `<run.dir>/hf/step-NNNNNNNN/` Hugging Face exports with metadata at a step or token interval."""

    name = "release"

    @dataclass
    class Config:
        every_n_steps: int = option(1000, "optimizer steps between exports (0: off)")
        every_n_tokens: int = option(0, "or each time the tokens seen cross a multiple of this (0: off)")
        at_end: bool = option(True, "also export the final model")
        dtype: str | None = option("bfloat16", "float32 | bfloat16 | float16 | null (as trained)")

        def __post_init__(self) -> None:
            for key in ("every_n_steps", "every_n_tokens"):
                if getattr(self, key) < 0:
                    raise UserError(f"plugins.release.{key}={getattr(self, key)} must be 0 (off) or positive.")
            if not (self.every_n_steps or self.every_n_tokens or self.at_end):
                raise UserError(
                    "plugins.release exports nothing with every_n_steps=0, every_n_tokens=0 and at_end=false: "
                    "set one of them."
                )
            torch_dtype(self.dtype, "plugins.release.dtype", none="the dtype the model trains in")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._exported_step = -1  # the step exported last (or the one training started from)
        self.released: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self._exported_step = trainer.global_step
        try:  # fail before training, not at the first export, when no Hugging Face layout describes the model
            hf_config(pl_module.model.config)
        except UserError as err:
            raise UserError(f"plugins.release cannot export this model: {err}") from None

    def on_step_end(self, trainer, pl_module, step: int) -> None:
        due = bool(self.cfg.every_n_steps) and step % self.cfg.every_n_steps == 0
        if self.cfg.every_n_tokens:
            seen, per_step = self.run.tokens_seen, self.run.tokens_per_batch
            due = due or seen // self.cfg.every_n_tokens > (seen - per_step) // self.cfg.every_n_tokens
        if due:
            self.export(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.cfg.at_end and trainer.global_step != self._exported_step:
            self.export(trainer, pl_module)

    def export(self, trainer, pl_module) -> Path:
        """Gather the weights on rank 0 and write the Hugging Face directory (every rank must call this)."""
        step = trainer.global_step
        self._exported_step = step
        state = full_state_dict(pl_module.model)
        out = Path(trainer.default_root_dir) / "hf" / f"step-{step:08d}"
        if trainer.is_global_zero:
            started = time.perf_counter()
            config = self.run.config
            save_hf(
                state,
                out,
                config=pl_module.model.config,  # the architecture as built (plugins may have changed it)
                tokenizer_dir=run_tokenizer_dir(asdict(config)),
                metadata=self.metadata(trainer, pl_module),
                dtype=torch_dtype(self.cfg.dtype),
            )
            self.released.append(step)
            seconds = time.perf_counter() - started
            self.log_event(trainer, pl_module, "release", path=str(out), seconds=round(seconds, 2))
        trainer.strategy.barrier("lit_open_release")
        return out

    def metadata(self, trainer, pl_module) -> dict[str, Any]:
        config = asdict(self.run.config)
        text = json.dumps(config, sort_keys=True, default=str)
        run = self.run
        evals = {k: v for k, v in run.last_metrics.items() if k.startswith(("val/", "eval/"))}
        return {
            "format": "lit-open-release/1",
            "step": trainer.global_step,
            "tokens": run.tokens_seen,
            "data_sequence": {
                "data_steps": [0, run.consumed_batches],
                "log": str(Path(trainer.default_root_dir) / "data_sequence"),
            },
            "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "eval": evals,
            "init_from": self.run.config.init_from,
            "rollbacks": run.rollbacks,
            "skipped_updates": run.skipped_updates,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": config,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"released": list(self.released)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.released = list(state["released"])
