"""release: every N steps or tokens (and at the end) the model as a Hugging Face directory in
`<run.dir>/hf/step-NNNNNNNN/`, with `lit_open.json` saying which data it has seen, LLM360-style, optionally pushed to
a hub repo as a branch named by a template (`ckpt_{index:03d}`, `stage{stage}-step{step}-tokens{tokens_b}B`) in a
background thread. Design, metadata and options: docs/plugins/release.md; `lit-open list plugins` shows the options
and their defaults.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lit_open.checkpoint.atomic import atomic_file
from lit_open.checkpoint.hf import METADATA_FILE, save_hf
from lit_open.checkpoint.hf_config import hf_config
from lit_open.checkpoint.hub_push import HubPusher, Outcome, Push, check_push_access, push_plan
from lit_open.data.tokenizer import run_tokenizer_dir
from lit_open.dtypes import torch_dtype
from lit_open.errors import UserError
from lit_open.parallel import full_state_dict
from lit_open.plugin import Plugin, option
from lit_open.train.progress import trainer_console

BRANCH_FIELDS = ("index", "step", "tokens", "tokens_b", "stage", "run")
BRANCH_EXAMPLES = (
    "'step{step}' (Pythia), 'ckpt_{index:03d}' (LLM360), 'stage{stage}-step{step}-tokens{tokens_b}B' (OLMo 2)"
)
# what the hub takes as a branch name, kept to characters that need no quoting anywhere
VALID_BRANCH = re.compile(r"(?!.*(?:\.\.|//|/\.|\.lock$|[/.]$))[A-Za-z0-9_][A-Za-z0-9._/-]*")
CARD_FILE = "README.md"
PLAN_FILE = "push_plan.jsonl"


class Release(Plugin):
    """Writes `<run.dir>/hf/step-NNNNNNNN/` Hugging Face exports with metadata at a step or token interval."""

    name = "release"

    @dataclass
    class Config:
        every_n_steps: int = option(1000, "optimizer steps between exports (0: off)")
        every_n_tokens: int = option(0, "or each time the tokens seen cross a multiple of this (0: off)")
        at_end: bool = option(True, "also export the final model")
        dtype: str | None = option("bfloat16", "float32 | bfloat16 | float16 | null (as trained)")
        push_to: str | None = option(None, "hub repo ORG/NAME each export is pushed to as a branch (null: local only)")
        branch: str = option("step{step}", f"branch name template; fields: {', '.join(BRANCH_FIELDS)}")
        stage: int = option(1, "the value of the branch template's {stage} field")
        private: bool = option(True, "create the repo private (a repo that exists keeps its visibility)")
        retries: int = option(3, "attempts after a failed push before it is given up")
        retry_backoff_s: float = option(30.0, "seconds before the first retry, doubled for each further one")
        push_wait_s: float = option(3600.0, "at the end of training, the longest wait for pushes still queued")
        dry_run: bool = option(False, f"append what would be pushed to <run.dir>/hf/{PLAN_FILE} instead of uploading")

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
            for key in ("stage", "retries", "retry_backoff_s", "push_wait_s"):
                if getattr(self, key) < 0:
                    raise UserError(f"plugins.release.{key}={getattr(self, key)} must be 0 or positive.")
            if self.push_to is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", self.push_to):
                raise UserError(
                    f"plugins.release.push_to={self.push_to!r} is not a hub repo id: give ORG/NAME (letters, digits, "
                    "'-', '_' and '.'), e.g. plugins.release.push_to=my-org/my-model, or null for local exports only."
                )
            if self.dry_run and self.push_to is None:
                raise UserError(
                    "plugins.release.dry_run=true records what would be pushed to plugins.release.push_to, which is "
                    "null: set push_to=ORG/NAME as well."
                )
            check_branch(self.branch, self.stage, "run")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._exported_step = -1  # the step exported last (or the one training started from)
        self.released: list[int] = []  # every export's step, over the whole run: the next one's branch index
        self._pusher: HubPusher | None = None  # made at the first push
        self._planned: list[str] = []  # the branches a dry run planned this session
        self._console = None  # where pushes report (the progress display's, if any), set at the first push
        self._ended = False  # the pushes' summary line was printed

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Refuse at start-up what would make every push fail. Checked on every process, so that all stop together
        (only global rank 0 pushes); not for `lit-open eval`, which is no training run."""
        if self.cfg.push_to is None or self.run.run_dir is None:
            return
        check_branch(self.cfg.branch, self.cfg.stage, self.run.config.run.name)
        if not self.cfg.dry_run:
            check_push_access("plugins.release.push_to")

    def on_train_start(self, trainer, pl_module) -> None:
        step = self._exported_step = trainer.global_step
        # The checkpoint of a step is written before this plugin's on_step_end (core callbacks first), so its state
        # lacks an export made at that same step; the export's directory (written whole or not at all) tells.
        if step and step not in self.released and self.export_dir(trainer, step).exists():
            self.released.append(step)
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
        # a run stopped by a signal or its time limit ends at once (its grace period is short): no wait
        self._end_pushes(wait=self.run.stopped is None)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._end_pushes(wait=False)  # the error is reported without waiting for uploads

    def export(self, trainer, pl_module) -> Path:
        """Gather the weights on rank 0 and write the Hugging Face directory (every rank must call this)."""
        step = trainer.global_step
        self._exported_step = step
        state = full_state_dict(pl_module.model)
        out = self.export_dir(trainer, step)
        if trainer.is_global_zero:
            started = time.perf_counter()
            metadata = self.metadata(trainer, pl_module)
            save_hf(
                state,
                out,
                config=pl_module.model.config,  # the architecture as built (plugins may have changed it)
                tokenizer_dir=run_tokenizer_dir(asdict(self.run.config)),
                metadata=metadata,
                dtype=torch_dtype(self.cfg.dtype),
            )
            index = len(self.released)
            self.released.append(step)
            seconds = time.perf_counter() - started
            self.log_event(trainer, pl_module, "release", path=str(out), seconds=round(seconds, 2))
            if self.cfg.push_to is not None:
                self._console = trainer_console(trainer)
                self.push(out, index, metadata)
        trainer.strategy.barrier("lit_open_release")
        return out

    @staticmethod
    def export_dir(trainer, step: int) -> Path:
        return Path(trainer.default_root_dir) / "hf" / f"step-{step:08d}"

    def push(self, out: Path, index: int, meta: dict[str, Any]) -> None:
        """Write the model card into the export `out`, then queue its push (or, in a dry run, record the plan)."""
        run_name = self.run.config.run.name
        tokens = meta["tokens"]
        branch = branch_name(self.cfg.branch, index, meta["step"], tokens, self.cfg.stage, run_name)
        repo = self.cfg.push_to
        with atomic_file(out / CARD_FILE) as tmp:
            tmp.write_text(model_card(meta, repo, branch, run_name, self.run.last_metrics.get("train/loss")))
        job = Push(out, branch, f"lit-open release: step {meta['step']:,}, {tokens:,} tokens", meta["step"])
        if self.cfg.dry_run:
            with self._plan_file().open("a") as f:
                f.write(json.dumps(push_plan(repo, job)) + "\n")
            self._planned.append(branch)
            return
        if self._pusher is None:
            self._pusher = HubPusher(
                repo,
                private=self.cfg.private,
                retries=self.cfg.retries,
                backoff_s=self.cfg.retry_backoff_s,
                on_outcome=self._record,
            )
        self._pusher.submit(job)

    def _record(self, outcome: Outcome) -> None:
        """A push's event (and a console line when it failed); called in the pusher's thread."""
        job = outcome.push
        fields = {"plugin": self.name, "repo": self.cfg.push_to, "branch": job.branch, "attempts": outcome.attempts}
        seconds = round(outcome.seconds, 2)
        if outcome.error is None:
            self.run.events.write(
                job.step, "release_pushed", **fields, commit=outcome.commit, url=outcome.url, seconds=seconds
            )
            return
        self.run.events.write(job.step, "release_push_failed", **fields, error=outcome.error, seconds=seconds)
        self._print(
            f"release: pushing {job.folder} to {self.cfg.push_to}@{job.branch} failed after {outcome.attempts} "
            f"attempt{'s' if outcome.attempts > 1 else ''} ({outcome.error}); the export stays on disk"
        )

    def _end_pushes(self, wait: bool) -> None:
        """Wait (bounded) for the queued pushes, then print one line saying what was pushed and what failed."""
        if self._ended:
            return
        self._ended = True
        if self._planned:
            self._print(
                f"release: dry run: {len(self._planned)} push{'es' if len(self._planned) > 1 else ''} to "
                f"{self.cfg.push_to} recorded in {self._plan_file()} (branches "
                f"{', '.join(self._planned)}); nothing uploaded"
            )
        pusher = self._pusher
        if pusher is None:
            return
        if wait:
            pusher.drain(
                self.cfg.push_wait_s,
                lambda pending, waited: self._print(
                    f"release: waiting for {pending} push{'es' if pending > 1 else ''} to {self.cfg.push_to} "
                    f"({waited:.0f} s so far, at most plugins.release.push_wait_s={self.cfg.push_wait_s:g})"
                ),
            )
        self._print(summary_line(pusher))

    def _plan_file(self) -> Path:
        return self.run.run_dir / "hf" / PLAN_FILE

    def _print(self, text: str) -> None:
        self._console.print(text, highlight=False, soft_wrap=True)  # one line in logs, whatever their width

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


def branch_name(template: str, index: int, step: int, tokens: int, stage: int, run: str) -> str:
    """The branch of the export numbered `index` (from 0) in the run, at `step` after `tokens` tokens."""
    # tokens_b rounds up as OLMo 2's revisions do: stage1-step1000-tokens5B of OLMo-2-1124-7B holds 4.19B tokens
    tokens_b = (tokens + 10**9 - 1) // 10**9
    return template.format(index=index, step=step, tokens=tokens, tokens_b=tokens_b, stage=stage, run=run)


def check_branch(template: str, stage: int, run: str) -> None:
    """Refuse a branch template with an unknown field or format spec, or that makes no valid branch name."""
    key, accepted = "plugins.release.branch", f"the fields are {', '.join(BRANCH_FIELDS)}, e.g. {BRANCH_EXAMPLES}"
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:  # an unmatched brace
        raise UserError(f"{key}={template!r} is not a format template ({err}): {accepted}.") from None
    unknown = [f"{{{name}}}" for name in names if re.split(r"[.\[]", name)[0] not in BRANCH_FIELDS]
    if unknown:
        raise UserError(f"{key}={template!r} uses the unknown field {', '.join(unknown)}: {accepted}.")
    try:
        sample = branch_name(template, 0, 0, 0, stage, run)
    except (ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise UserError(
            f"{key}={template!r} cannot be formatted ({type(err).__name__}: {err}): {accepted} (all integers but "
            "run, a string)."
        ) from None
    if not VALID_BRANCH.fullmatch(sample):
        raise UserError(
            f"{key}={template!r} makes the branch name {sample!r} (run.name={run!r}), which a hub repo does not take: "
            "use letters, digits, '.', '_', '-' and '/' (not first, last or doubled), "
            f"e.g. {BRANCH_EXAMPLES}."
        )


def model_card(meta: dict[str, Any], repo: str, branch: str, run: str, train_loss: float | None) -> str:
    """The README.md of a pushed export: how to load it, the data it has seen, its metrics, where its config is."""
    first, end = meta["data_sequence"]["data_steps"]
    metrics = ({f"train/loss (step {meta['step']:,})": train_loss} if train_loss is not None else {}) | meta["eval"]
    rows = "".join(f"| {name} | {value:.4g} |\n" for name, value in metrics.items())
    return f"""---
library_name: transformers
tags:
- lit-open
---

# {repo} @ {branch}

Step {meta["step"]:,} of the lit-open run `{run}`: {meta["tokens"]:,} tokens seen.

```python
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{repo}", revision="{branch}")
```

## Data

The global batches {first:,} to {end - 1:,} of the run's data order (`data_sequence.data_steps` [{first}, {end}) in
[{METADATA_FILE}]({METADATA_FILE})). The samples of every batch are listed in the run's data sequence log,
`{meta["data_sequence"]["log"]}`, which also marks the batches whose update was skipped or rolled back
(`lit-open data show run.dir=RUN step=N` decodes them).

## Metrics

| metric | value |
|---|---|
{rows}
## Config

The run's resolved config is `config` in [{METADATA_FILE}]({METADATA_FILE}) (SHA-256 `{meta["config_sha256"]}`),
beside `init_from` ({meta["init_from"] or "none: trained from scratch"}), `rollbacks` ({meta["rollbacks"]}) and
`skipped_updates` ({meta["skipped_updates"]}).
"""


def summary_line(pusher: HubPusher) -> str:
    """`release: pushed N of M exports to ORG/NAME (branches ...); K failed: ...` for the end of the run."""
    outcomes = list(pusher.outcomes)
    pushed = [o.push.branch for o in outcomes if o.error is None]
    failed = [o for o in outcomes if o.error is not None]
    line = f"release: pushed {len(pushed)} of {pusher.submitted} exports to {pusher.repo}"
    if pushed:
        line += f" (branches {', '.join(pushed)})"
    if failed:
        line += f"; {len(failed)} failed: " + "; ".join(
            f"{o.push.branch} after {o.attempts} attempts ({o.error})" for o in failed
        )
    pending = pusher.submitted - len(outcomes)
    if pending:
        line += (
            f"; {pending} not pushed when the run ended (their exports are on disk: "
            f"`hf upload {pusher.repo} DIR --revision BRANCH` pushes one)"
        )
    return line
