"""lm_eval: benchmark the model with lm-evaluation-harness while it trains, every N steps and at the end.

What: at every `every_n_steps`-th optimizer step (and at the end of training when `at_end`) the in-memory model,
sharded or not, runs the lm-eval `tasks` through lit-open's adapter (`lit_open.eval.harness.LitOpenLM`: the run's
tokenizer, no BOS, EOS as the context of empty-context requests, batches of `batch_size`). The results land in the
metrics row of that step as `eval/<task>/<metric>` (e.g. `eval/hellaswag/acc_norm`, `eval/my_ppl/bits_per_byte`),
so every logger (metrics.csv, TensorBoard, ...) gets them, and an `eval` event in events.jsonl holds them with the
seconds taken. `lit-open eval checkpoint=... tasks=[...]` computes the same numbers offline for a checkpoint.

Tasks are lm-eval task names (hellaswag, arc_easy, lambada_openai, ...: their datasets must be reachable at run
time, from the Hugging Face hub or a prepared HF_DATASETS_CACHE) or local task directories / YAML files, which work
offline: lm-eval task YAMLs with `dataset_path: json` and `dataset_kwargs.data_files` naming JSONL files relative
to the YAML file. Everything is checked and loaded when training starts: a missing path or an unknown task name
fails then, not at the first evaluation. Unless HF_DATASETS_CACHE is set, datasets are cached in a temporary
directory removed when training ends.

Distributed runs: every process takes part (a sharded model needs all of them for each forward pass); requests
are split across data-parallel ranks, tensor-parallel peers score the same ones, and global rank 0 logs. Each task
needs at least as many documents (after `limit`) as there are data-parallel processes.

Why: held-out loss says little about what a model can do; benchmark curves along the run (OLMo, Pythia, LLM360
publish them) show when abilities appear and catch regressions early. A `limit` of a few hundred documents per task
keeps each evaluation to seconds or minutes.

Options (`plugins.lm_eval.<option>`):
- tasks (list of str): lm-eval task names and/or local task directories or YAML files (required);
  `prepared:next_line` is the benchmark `lit-open prepare` builds from held-out documents beside the data it
  prepares (pick the true next line among four; see lit_open.data.next_line): the quickstart recipe uses it.
- every_n_steps (int, default 1000; 0: none in between), at_start (bool, default false: also the model training
  starts from, in a fresh run), at_end (bool, default true): when to evaluate.
- limit (int or null, default null: all): documents per task.
- batch_size (int, default 8): sequences per forward pass.
- num_fewshot (int or null, default null: each task's own setting, else 0): few-shot examples per prompt.
- max_gen_tokens (int, default 32): new tokens for generation tasks that do not set max_gen_toks.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

from lit_open.errors import UserError
from lit_open.plugin import Plugin
from lit_open.progress import trainer_console


class LMEval(Plugin):
    """Runs lm-eval tasks on the in-memory model every N optimizer steps and at the end of training."""

    name = "lm_eval"

    @dataclass
    class Config:
        tasks: list[str] = field(default_factory=list)
        every_n_steps: int = 1000
        at_start: bool = False
        at_end: bool = True
        limit: int | None = None
        batch_size: int = 8
        num_fewshot: int | None = None
        max_gen_tokens: int = 32

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
        self.task_dict: dict[str, Any] | None = None
        self._last_step = -1  # the step evaluated last
        self._cache: tempfile.TemporaryDirectory | None = None  # HF_DATASETS_CACHE unless the user set one
        self._cache_before: Any = None

    def on_train_start(self, trainer, pl_module) -> None:
        from lit_open.eval.harness import use_datasets_cache

        if "HF_DATASETS_CACHE" not in os.environ:
            self._cache = tempfile.TemporaryDirectory(prefix="lit-open-lm-eval-")
            self._cache_before = use_datasets_cache(self._cache.name)
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
        from lit_open.convert import run_tokenizer_dir
        from lit_open.eval.harness import load_tasks, resolve_tasks, tokenizer_and_eos

        tokenizer_dir = run_tokenizer_dir(asdict(pl_module.config))
        if tokenizer_dir is None:
            raise UserError(
                "plugins.lm_eval needs the run's tokenizer: set data.tokenizer to the tokenizer.json the data was "
                "prepared with."
            )
        self._tokenizer = tokenizer_and_eos(tokenizer_dir)
        specs = resolve_tasks(self.cfg.tasks, "plugins.lm_eval.tasks", data_dir=tokenizer_dir)
        self.task_dict = load_tasks(specs, self.cfg.num_fewshot)
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
        from lit_open.eval.harness import LitOpenLM

        mesh = pl_module.device_mesh
        data_parallel = mesh["data_parallel"] if mesh is not None else None
        tokenizer, eos_id = self._tokenizer
        return LitOpenLM(
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
        from lit_open.eval.harness import run_tasks

        self._last_step = trainer.global_step
        if self.lm.model is not pl_module.model:  # the module's model was replaced (a restore)
            self.lm = self._adapter(pl_module)
        outcome = run_tasks(self.lm, self.task_dict, self.cfg.limit)
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
        from lit_open.eval.harness import use_datasets_cache

        if self._cache is not None:
            use_datasets_cache(None, self._cache_before)
            self._cache.cleanup()
            self._cache = None
