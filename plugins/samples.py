"""samples: generate from fixed prompts every N steps, greedy and sampled, so a human sees the model improve.

What: at every `every_n_steps`-th optimizer step (and when training starts and ends, with `at_start` / `at_end`),
each prompt is continued by up to `max_new_tokens` tokens greedily and `num_sampled` times by sampling
(`temperature`, `top_k`), with `lit_open.generate`. The LLM360 team calls this test-out generation: a loss curve says
that the model improves, the text says how (first repeated spaces, then keywords, then plausible lines). Written to:
- `<run.dir>/samples.jsonl`, one line per prompt per occasion: step, tokens (seen so far), prompt, greedy, sampled
  (a list), temperature, top_k, seed, seconds (the whole occasion's generation time);
- a `samples` event in events.jsonl (the prompt count, the seconds and the first prompt's greedy text, truncated);
- TensorBoard text (`samples/prompt_<i>`) when the TensorBoard logger is on, and one console line per prompt.

Prompts are encoded as training documents are (lit_open.data.prepare): after an end-of-document token, as a
document starts right after the previous one's EOS, with the tokenizer's own special tokens only when the data was
prepared with add_special_tokens. A continuation ends at EOS. The tokenizer is the run's (`data.tokenizer`, or the
one next to the prepared sources).

Determinism: the sampling generator is seeded from (run.seed, step), so every rank draws the same tokens (a
sharded model needs all ranks to generate together; global rank 0 writes) and two identical runs, or a resumed
one, write the same text. The model is put in eval mode for generation and back afterwards; the training RNG is
not touched. After a rollback the steps trained again are sampled again: the file keeps both, in order. A resumed
run drops the lines after the step it resumes from (a crashed session may have written them) and does not sample
that step again when the file already has it (it does when it is due and the file lacks it); a fresh run starts
the file anew. So the file of a crashed and resumed run equals the uninterrupted run's, sampled text included
(timings aside).

Options (`plugins.samples.<option>`):
- prompts (list of strings, default ["def ", "import ", "class ", "The "]): the texts to continue.
- every_n_steps (int, default 500; 0: only at start/end), at_start (bool, default true: the initial model of a
  fresh run), at_end (bool, default true: the final model).
- max_new_tokens (int, default 48), temperature (float > 0, default 0.8), top_k (int >= 1 or null, default 50),
  num_sampled (sampled continuations per prompt, default 1; 0: greedy only).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tokenizers import Tokenizer

from lit_open.convert import run_tokenizer_dir
from lit_open.errors import UserError
from lit_open.generate import generate
from lit_open.plugin import Plugin
from lit_open.progress import trainer_console

SAMPLES_FILE = "samples.jsonl"
CONSOLE_CHARS = 100  # a console line shows this much of a continuation
EVENT_CHARS = 60


@dataclass
class PromptEncoding:
    """How the run's training documents were tokenized, so that prompts look like the start of one."""

    tokenizer: Tokenizer
    eos_id: int
    add_special_tokens: bool

    def encode(self, prompt: str) -> list[int]:
        return [self.eos_id, *self.tokenizer.encode(prompt, add_special_tokens=self.add_special_tokens).ids]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def prompt_encoding(config: dict[str, Any]) -> PromptEncoding:
    """The run's tokenizer and EOS from its config (as a dict): the training sources' manifest when there is one."""
    from lit_open.data.prepare import MANIFEST, load_tokenizer, resolve_eos

    directory = run_tokenizer_dir(config)
    if directory is None:
        raise UserError(
            "plugins.samples needs the run's tokenizer to encode its prompts, but neither data.tokenizer nor the "
            "directories of data.sources hold a tokenizer.json. Set data.tokenizer=PATH/tokenizer.json."
        )
    tokenizer = load_tokenizer(directory)
    for source in config.get("data", {}).get("sources", []):
        manifest = Path(source["path"]).expanduser() / MANIFEST
        if manifest.is_file():
            info = json.loads(manifest.read_text())
            return PromptEncoding(tokenizer, info["tokenizer"]["eos_id"], info.get("add_special_tokens", False))
    return PromptEncoding(tokenizer, resolve_eos(tokenizer, directory)[1], False)


def sampling_seed(run_seed: int, step: int) -> int:
    """The seed of an occasion's sampling generator: the same on every rank and in every rerun of the step."""
    return int(np.random.SeedSequence([run_seed, step, 0x5A3D]).generate_state(1, np.uint64)[0] >> 1)


class Samples(Plugin):
    """Continues fixed prompts (greedy and sampled) every N steps; writes samples.jsonl, an event, TensorBoard text."""

    name = "samples"

    @dataclass
    class Config:
        prompts: list[str] = field(default_factory=lambda: ["def ", "import ", "class ", "The "])
        every_n_steps: int = 500
        at_start: bool = True
        at_end: bool = True
        max_new_tokens: int = 48
        temperature: float = 0.8
        top_k: int | None = 50
        num_sampled: int = 1

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
        self.encoding: PromptEncoding | None = None
        self._last_step = -1  # the step of the last update seen (or the one training started from)
        self._sampled_step = -1  # the step sampled last

    def on_train_start(self, trainer, pl_module) -> None:
        self.encoding = prompt_encoding(asdict(pl_module.config))
        step = trainer.global_step
        self._last_step = step
        on_file = self._restart_file(trainer, step) if trainer.is_global_zero else None
        self._sampled_step = step if trainer.strategy.broadcast(on_file, src=0) else -1
        # a resumed run samples its first step only if the interrupted session was due to and did not get to it
        due = self.cfg.at_start if step == 0 else self._due(step)
        if due and self._sampled_step != step:
            self.sample(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step or batch["micro"] + 1 != batch["n_micro"]:
            return  # mid-accumulation, or the update was skipped
        self._last_step = step
        if self._due(step):
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.cfg.at_end and self._sampled_step != trainer.global_step:
            self.sample(trainer, pl_module)

    def on_rollback(self, trainer, pl_module, rolled_back) -> None:
        # the restored state was sampled (or not) the first time round; the steps after it are new models
        self._last_step = self._sampled_step = rolled_back.to_step

    def _due(self, step: int) -> bool:
        return bool(self.cfg.every_n_steps) and step % self.cfg.every_n_steps == 0

    def sample(self, trainer, pl_module) -> None:
        """Generate for every prompt (every rank must call this) and record the result on global rank 0."""
        step = trainer.global_step
        self._sampled_step = step
        model = pl_module.model
        cfg = self.cfg
        seed = sampling_seed(pl_module.config.run.seed, step)
        prompts = [self.encoding.encode(p) for p in cfg.prompts]
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
                "tokens": pl_module.consumed_batches * pl_module.tokens_per_batch,
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
