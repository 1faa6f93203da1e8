"""lm_eval: lm-evaluation-harness tasks on the in-memory model (sharded or not) every N steps, at the end and optionally
at the start, through the adapter `lit-open eval` uses: `eval/<task>/<metric>` in the step's metrics row (every
logger) and an `eval` event. Tasks are lm-eval names, local task directories (offline) or `prepared:next_line`. Design
and options: docs/plugins/lm_eval.md; `lit-open list plugins` shows the options and their defaults.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

from lit_open.config import DEFAULT_MAX_GEN_TOKENS
from lit_open.data.tokenizer import run_tokenizer
from lit_open.errors import UserError
from lit_open.plugin import Plugin, option
from lit_open.train.progress import trainer_console


def harness() -> Any:
    """lit_open.eval.harness, imported on first use: it imports lm-eval (seconds), and this module is imported by
    every composition that lists the installed plugins."""
    import lit_open.eval.harness as module  # see the docstring

    return module


class LMEval(Plugin):
    """Runs lm-eval tasks on the in-memory model every N optimizer steps and at the end of training."""

    name = "lm_eval"

    @dataclass
    class Config:
        tasks: list[str] = option(
            [], "lm-eval task names (need their datasets at run time) and/or local task directories / YAML files"
        )
        every_n_steps: int = option(1000, "optimizer steps between evaluations (0: only at the end)")
        at_start: bool = option(False, "also evaluate the model training starts from (a fresh run's step 0)")
        at_end: bool = option(True, "also evaluate the final model")
        limit: int | None = option(None, "documents per task (null: all)")
        batch_size: int = option(8, "sequences per forward pass")
        num_fewshot: int | None = option(None, "few-shot examples per prompt (null: each task's own setting, else 0)")
        max_gen_tokens: int = option(
            DEFAULT_MAX_GEN_TOKENS, "new tokens for generation tasks that do not set max_gen_toks"
        )

        def __post_init__(self) -> None:
            if not self.tasks:
                raise UserError(
                    "plugins.lm_eval.tasks is empty: give lm-eval task names and/or local task directories, e.g. "
                    "plugins.lm_eval.tasks=[hellaswag,/data/my_tasks]."
                )
            if self.every_n_steps < 0:
                raise UserError(f"plugins.lm_eval.every_n_steps={self.every_n_steps} must be 0 (only at end) or more.")
            if not (self.every_n_steps or self.at_start or self.at_end):
                raise UserError(
                    "plugins.lm_eval evaluates nothing with every_n_steps=0, at_start=false and at_end=false: set "
                    "one of them."
                )
            for key in ("limit", "batch_size", "max_gen_tokens"):
                value = getattr(self, key)
                if value is not None and value < 1:
                    accepted = (
                        "a positive number of documents per task, or null (all)" if key == "limit" else "1 or more"
                    )
                    raise UserError(f"plugins.lm_eval.{key}={value} is not accepted: give {accepted}.")
            if self.num_fewshot is not None and self.num_fewshot < 0:
                raise UserError(
                    f"plugins.lm_eval.num_fewshot={self.num_fewshot} must be 0 or more, or null (each task's own)."
                )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.lm: Any = None  # the lm-eval adapter over the module's model
        self._tokenizer: tuple[Any, int] | None = None  # the run's tokenizer and its end-of-document id
        self._specs: list[Any] | None = None  # the tasks, resolved at setup
        self.task_dict: dict[str, Any] | None = None
        self._last_step = -1  # the step evaluated last
        self._cache: tempfile.TemporaryDirectory | None = None  # HF_DATASETS_CACHE unless the user set one
        self._cache_before: Any = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        """The tasks are resolved (paths, names) before the first validation, so a missing one fails at once."""
        if self._specs is None:
            tokenizer = run_tokenizer(asdict(self.run.config), "plugins.lm_eval")
            self._tokenizer = (tokenizer.tokenizer, tokenizer.eos_id)
            self._specs = harness().resolve_tasks(self.cfg.tasks, "plugins.lm_eval.tasks", data_dir=tokenizer.directory)

    def on_train_start(self, trainer, pl_module) -> None:
        if "HF_DATASETS_CACHE" not in os.environ:
            self._cache = tempfile.TemporaryDirectory(prefix="lit-open-lm-eval-")
            self._cache_before = harness().use_datasets_cache(self._cache.name)
        try:
            self._prepare(trainer, pl_module)
        except BaseException:
            self.teardown(trainer, pl_module, "fit")
            raise
        self._last_step = -1
        if self.cfg.at_start and trainer.global_step == 0:  # the untrained model's scores: the curve's origin
            self._evaluate_and_log(trainer, pl_module)

    def _prepare(self, trainer, pl_module) -> None:
        """Load the tasks and build the adapter; a bad task, path or tokenizer fails here, before training."""
        self.setup(trainer, pl_module, "fit")
        self.task_dict = harness().load_tasks(self._specs, self.cfg.num_fewshot)
        self.lm = self._adapter(pl_module)
        for name, task in self.task_dict["tasks"].items():
            docs = len(task.eval_docs)
            if self.cfg.limit is not None:
                docs = min(docs, self.cfg.limit)
            if docs < self.lm.world_size:
                raise UserError(
                    f"plugins.lm_eval: task {name} has {docs} documents to evaluate, fewer than the "
                    f"{self.lm.world_size} data-parallel processes; raise plugins.lm_eval.limit or drop the task."
                )

    def _adapter(self, pl_module) -> Any:
        mesh = pl_module.device_mesh
        data_parallel = mesh["data_parallel"] if mesh is not None else None
        tokenizer, eos_id = self._tokenizer
        return harness().LitOpenLM(
            pl_module.model,
            tokenizer,
            eos_id,
            batch_size=self.cfg.batch_size,
            max_gen_tokens=self.cfg.max_gen_tokens,
            data_parallel=data_parallel.get_group() if data_parallel is not None else None,
            tensor_parallel_size=mesh["tensor_parallel"].size() if mesh is not None else 1,
        )

    def step_metrics(self, trainer, pl_module) -> dict[str, float]:
        step = trainer.global_step
        due = bool(self.cfg.every_n_steps) and step % self.cfg.every_n_steps == 0
        due = due or (self.cfg.at_end and trainer.max_steps > 0 and step >= trainer.max_steps)
        return self.evaluate(trainer, pl_module) if due else {}

    def on_train_end(self, trainer, pl_module) -> None:
        # training may end before max_steps (time limit, an interrupted epoch): the final model is still evaluated
        if self.cfg.at_end and self.task_dict is not None and trainer.global_step != self._last_step:
            self._evaluate_and_log(trainer, pl_module)

    def _evaluate_and_log(self, trainer, pl_module) -> None:
        """An evaluation outside an optimizer step's metrics row: its own row for the loggers."""
        pl_module.log_row(self.evaluate(trainer, pl_module))

    def evaluate(self, trainer, pl_module) -> dict[str, float]:
        """Run the tasks now (every process must call this); the flat metrics, on global rank 0 (else empty)."""
        self._last_step = trainer.global_step
        if self.lm.model is not pl_module.model:  # the module's model was replaced (a restore)
            self.lm = self._adapter(pl_module)
        with self.run.busy("lm_eval"):
            outcome = harness().run_tasks(self.lm, self.task_dict, self.cfg.limit)
        if not trainer.is_global_zero:
            return {}
        scores = ", ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in outcome.metrics.items())
        trainer_console(trainer).print(
            f"eval at step {trainer.global_step}: {scores} ({outcome.seconds:.1f} s)", markup=False, highlight=False
        )
        self.log_event(
            trainer, pl_module, "eval", results=outcome.metrics, limit=self.cfg.limit, seconds=round(outcome.seconds, 2)
        )
        return outcome.metrics

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._cache is not None:
            harness().use_datasets_cache(None, self._cache_before)
            self._cache.cleanup()
            self._cache = None
