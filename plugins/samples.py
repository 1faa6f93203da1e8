"""samples: greedy and sampled continuations of fixed prompts every N steps (and at the start and end), so that a human
sees the model improve (LLM360's test-out generation), in `<run.dir>/samples.jsonl`, an event, TensorBoard text and
the console; seeded by (run.seed, step), so reruns and resumed runs write the same text. Design and options:
docs/plugins/samples.md; `lit-open list plugins` shows the options and their defaults.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lit_open.data.tokenizer import RunTokenizer, run_tokenizer
from lit_open.errors import UserError
from lit_open.generate import generate
from lit_open.plugin import Plugin, option
from lit_open.train.progress import trainer_console

SAMPLES_FILE = "samples.jsonl"
CONSOLE_CHARS = 100  # a console line shows this much of a continuation
EVENT_CHARS = 60


def prompt_encoding(config: dict[str, Any]) -> RunTokenizer:
    """How the run's documents were encoded: prompts are encoded as the start of one."""
    return run_tokenizer(config, "plugins.samples")


def sampling_seed(run_seed: int, step: int) -> int:
    """The seed of an occasion's sampling generator: the same on every rank and in every rerun of the step."""
    return int(np.random.SeedSequence([run_seed, step, 0x5A3D]).generate_state(1, np.uint64)[0] >> 1)


class Samples(Plugin):
    """Continues fixed prompts (greedy and sampled) every N steps; writes samples.jsonl, an event, TensorBoard text."""

    name = "samples"

    @dataclass
    class Config:
        prompts: list[str] = option(
            ["def ", "import ", "class ", "The "], "texts to continue, encoded as the start of a training document"
        )
        every_n_steps: int = option(500, "optimizer steps between occasions (0: only at start/end)")
        at_start: bool = option(
            True, "also sample the initial model (or, resumed, the step resumed from unless already sampled)"
        )
        at_end: bool = option(True, "also sample the final model")
        max_new_tokens: int = option(48, "tokens generated per continuation (fewer when EOS comes first)")
        temperature: float = option(0.8, "temperature of the sampled continuations (greedy is always written)")
        top_k: int | None = option(50, "sample among the k most likely tokens (null: all)")
        num_sampled: int = option(1, "sampled continuations per prompt (0: greedy only)")

        def __post_init__(self) -> None:
            if not self.prompts or not all(isinstance(p, str) and p for p in self.prompts):
                raise UserError(
                    f"plugins.samples.prompts={self.prompts!r} must be a non-empty list of non-empty strings."
                )
            for key in ("every_n_steps", "num_sampled"):
                if getattr(self, key) < 0:
                    raise UserError(f"plugins.samples.{key}={getattr(self, key)} must be 0 or positive.")
            if self.max_new_tokens < 1:
                raise UserError(f"plugins.samples.max_new_tokens={self.max_new_tokens} must be at least 1.")
            if not self.temperature > 0:
                raise UserError(
                    f"plugins.samples.temperature={self.temperature} must be above 0 (greedy text is always written)."
                )
            if self.top_k is not None and self.top_k < 1:
                raise UserError(f"plugins.samples.top_k={self.top_k} must be at least 1, or null for all tokens.")
            if not (self.every_n_steps or self.at_start or self.at_end):
                raise UserError(
                    "plugins.samples generates nothing with every_n_steps=0, at_start=false and at_end=false: "
                    "set one of them."
                )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.encoding: RunTokenizer | None = None
        self._sampled_step = -1  # the step sampled last

    def on_train_start(self, trainer, pl_module) -> None:
        self.encoding = prompt_encoding(asdict(self.run.config))
        step = trainer.global_step
        on_file = self._restart_file(trainer, step) if trainer.is_global_zero else None
        self._sampled_step = step if trainer.strategy.broadcast(on_file, src=0) else -1
        # a resumed run samples its first step only if the interrupted session was due to and did not get to it
        due = self.cfg.at_start if step == 0 else self._due(step)
        if due and self._sampled_step != step:
            self.sample(trainer, pl_module)

    def on_step_end(self, trainer, pl_module, step: int) -> None:
        if self._due(step):
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.cfg.at_end and self._sampled_step != trainer.global_step:
            self.sample(trainer, pl_module)

    def on_rollback(self, trainer, pl_module, rolled_back) -> None:
        # the restored state was sampled (or not) the first time round; the steps after it are new models
        self._sampled_step = rolled_back.to_step

    def _due(self, step: int) -> bool:
        return bool(self.cfg.every_n_steps) and step % self.cfg.every_n_steps == 0

    def sample(self, trainer, pl_module) -> None:
        """Generate for every prompt (every rank must call this) and record the result on global rank 0."""
        step = trainer.global_step
        self._sampled_step = step
        model = pl_module.model
        cfg = self.cfg
        seed = sampling_seed(self.run.config.run.seed, step)
        prompts = [self.encoding.encode_document_start(p) for p in cfg.prompts]
        stop_ids = [self.encoding.eos_id]
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            greedy = generate(model, prompts, cfg.max_new_tokens, stop_ids=stop_ids)
            sampled: list[list[int]] = []
            if cfg.num_sampled:
                device = next(model.parameters()).device
                generator = torch.Generator(device=device).manual_seed(seed)
                sampled = generate(
                    model,
                    [p for p in prompts for _ in range(cfg.num_sampled)],
                    cfg.max_new_tokens,
                    temperature=cfg.temperature,
                    top_k=cfg.top_k,
                    generator=generator,
                    stop_ids=stop_ids,
                )
        finally:
            model.train(was_training)
        seconds = round(time.perf_counter() - started, 3)
        decode = self.encoding.decode
        records = [
            {
                "step": step,
                "tokens": self.run.tokens_seen,
                "prompt": prompt,
                "greedy": decode(greedy[i]),
                "sampled": [decode(s) for s in sampled[i * cfg.num_sampled : (i + 1) * cfg.num_sampled]],
                "temperature": cfg.temperature,
                "top_k": cfg.top_k,
                "seed": seed,
                "seconds": seconds,
            }
            for i, prompt in enumerate(cfg.prompts)
        ]
        if trainer.is_global_zero:
            self._write(trainer, pl_module, records, seconds)

    def _write(self, trainer, pl_module, records: list[dict[str, Any]], seconds: float) -> None:
        step = trainer.global_step
        with (Path(trainer.default_root_dir) / SAMPLES_FILE).open("a") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        first = records[0]["prompt"] + records[0]["greedy"]
        self.log_event(trainer, pl_module, "samples", prompts=len(records), seconds=seconds, first=first[:EVENT_CHARS])
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for i, record in enumerate(records):
                    logger.experiment.add_text(f"samples/prompt_{i}", _markdown(record), global_step=step)
        console = trainer_console(trainer)
        console.print(f"samples at step {step} ({seconds:.1f} s):", markup=False, highlight=False)
        for record in records:
            text = (record["prompt"] + record["greedy"]).replace("\n", "\\n")
            console.print(f"  {text[:CONSOLE_CHARS]}", markup=False, highlight=False)

    def _restart_file(self, trainer, start_step: int) -> bool:
        """Keep the lines of samples.jsonl up to the step a resumed run starts from (none for a fresh run, which
        starts at 0); whether that step was sampled. Global rank 0 only."""
        path = Path(trainer.default_root_dir) / SAMPLES_FILE
        if not path.is_file():
            return False
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if start_step > 0 and json.loads(line)["step"] <= start_step]
        if len(kept) != len(lines):
            path.write_text("".join(line + "\n" for line in kept))
        return any(json.loads(line)["step"] == start_step for line in kept)


def _markdown(record: dict[str, Any]) -> str:
    """A TensorBoard text entry (TensorBoard renders markdown; indented lines stay verbatim)."""
    parts = ["**greedy**", _indent(record["prompt"] + record["greedy"])]
    for i, text in enumerate(record["sampled"]):
        parts += [f"**sampled {i + 1}** (temperature {record['temperature']}, top_k {record['top_k']})"]
        parts += [_indent(record["prompt"] + text)]
    return "\n\n".join(parts)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines() or [""])
