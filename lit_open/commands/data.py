"""`lit-open data show|locate`: the samples of a global batch, and the steps that trained on a sample or a text.

    lit-open data show run.dir=RUN [step=N | data_step=D | released_step=S] [samples=4] [chars=300]
    lit-open data show recipe=amber_7b_continue data.root=/data/amber released_step=92202
    lit-open data locate run.dir=RUN (sample=[SOURCE,INDEX] | file=NAME index=I | contains=TEXT) [steps=[A,B]]

Both read the run's config (`RUN/config.yaml`) or compose one from the same overrides as `lit-open train`, and
compute the order as training does (a pure function of the step: no log is scanned, no model is loaded).
`step` is an optimizer step of the run: the data-sequence log tells which global batch it trained on (after skipped
updates and rollbacks they differ); without a log, global batch step - 1. A sample is shown decoded when the run's
tokenizer is known (data.tokenizer, or the one beside prepared sources), else as token ids.

locate: `sample=[SOURCE,INDEX]` (numbers as in the data-sequence log) or `file=NAME index=I` (a released file and
the sample's index in it, as the publisher numbers them) gives every step whose global batch holds that sample:
computed by inverting a released order, or by computing lit-open's mixture over `steps=[A,B]` (global batches;
default: the run's). `contains=TEXT` decodes the samples of global batches `steps=[A,B]` and lists where TEXT occurs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from lit_open.compose import load_train_config
from lit_open.config import TrainConfig
from lit_open.data.datamodule import DataModule, TokenSamples, open_sources
from lit_open.data.sequence import read_data_sequence
from lit_open.data.tokenizer import RunTokenizer, run_tokenizer
from lit_open.errors import UserError
from lit_open.plugin import build_plugins
from lit_open.train.runner import with_data_start, with_plugin_options

ACTIONS = ("show", "locate")
CONTAINS_MAX_STEPS = 100_000  # global batches decoded by one `contains=` search


@dataclasses.dataclass
class DataCommand:
    """The data command's own keys; every other key=value is a training-config override."""

    step: int | None = None  # show: an optimizer step of the run (1 = the first update)
    data_step: int | None = None  # show: a global batch of the run's order (0 = the first)
    released_step: int | None = None  # show: a global batch of the released run (released orders)
    samples: int = 4  # show: samples printed (0: all of the global batch)
    chars: int = 300  # show: characters of each sample printed
    sample: list[int] | None = None  # locate: [source, index] as in the data-sequence log
    file: str | None = None  # locate: a released file's name ...
    index: int | None = None  # ... and the sample's index in it
    contains: str | None = None  # locate: text to look for in the decoded samples of `steps`
    steps: list[int] | None = None  # locate: global batches [first, last] searched (mixture, contains)


def parse(args: list[str]) -> tuple[str, DataCommand, list[str]]:
    if not args or args[0] not in ACTIONS:
        raise UserError(f"lit-open data needs an action: {' or '.join(ACTIONS)} (see `lit-open --help`).")
    own = {f.name for f in dataclasses.fields(DataCommand)}
    values: dict[str, Any] = {}
    overrides = []
    for arg in args[1:]:
        key, sep, value = arg.partition("=")
        if sep and key in own:
            values[key] = _value(key, value)
        else:
            overrides.append(arg)
    return args[0], DataCommand(**values), overrides


def _value(key: str, text: str) -> Any:
    kind = {f.name: f.type for f in dataclasses.fields(DataCommand)}[key]
    try:
        if "list" in kind:
            parsed = json.loads(text)
            if not (isinstance(parsed, list) and len(parsed) == 2 and all(isinstance(v, int) for v in parsed)):
                raise ValueError
            return parsed
        return int(text) if "int" in kind else text
    except ValueError:
        want = "two integers, e.g. [0,4711]" if "list" in kind else "an integer" if "int" in kind else "text"
        raise UserError(f"lit-open data: {key}={text!r} must be {want}.") from None


def load_config(overrides: list[str]) -> TrainConfig:
    """The run's saved config when run.dir=DIR holds one (overrides apply on top), else a composed one."""
    run_dir = next((o.partition("=")[2] for o in overrides if o.startswith("run.dir=")), None)
    saved = Path(run_dir).expanduser() / "config.yaml" if run_dir else None
    if saved is not None and saved.is_file():
        return load_train_config(overrides, config_file=saved)
    if saved is not None and not any(o.startswith(("recipe=", "data.")) for o in overrides):
        raise UserError(
            f"run.dir={run_dir!r} holds no config.yaml (not a lit-open run directory). Give a run's directory, or "
            "the data settings (recipe=NAME or data.sources=... data.order=...) to compute the order from."
        )
    return load_train_config(overrides)


class OrderView:
    """A run's global order, its sources opened, ready to show or search."""

    def __init__(self, cfg: TrainConfig) -> None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_sources=[]))  # training data only
        plugins = build_plugins(cfg.plugins)
        cfg = with_plugin_options(cfg, plugins)
        datamodule = DataModule(cfg.data, cfg.run.seed, [phase for p in plugins for phase in p.data_phases(cfg)])
        if cfg.data.order != "mixture":
            opened = open_sources(cfg.data.sources, cfg.data.seq_len + 1, "data.sources")
            cfg = with_data_start(cfg, None, opened, check_span=False)
            datamodule.cfg = cfg.data
        datamodule.setup("fit")
        self.cfg, self.datamodule = cfg, datamodule
        self.order, self.sources = datamodule.order, datamodule.train_sources
        self.start = cfg.data.start_step or 0
        self.reader = TokenSamples(self.sources, cfg.data.seq_len + 1)
        self.tokenizer: RunTokenizer | None = None
        try:
            self.tokenizer = run_tokenizer(dataclasses.asdict(cfg), "lit-open data")
        except UserError:
            pass  # token ids are shown instead

    def tokens(self, source: int, index: int) -> np.ndarray:
        return self.reader[(source, index, 0, 0, 1)]["tokens"].numpy()

    def text(self, source: int, index: int) -> str | None:
        return self.tokenizer.decode(self.tokens(source, index).tolist()) if self.tokenizer else None

    def where(self, source: int, index: int) -> str:
        located = self.sources[source].locate(index)
        name = f"{located[0]} #{located[1]}" if located else f"sample {index}"
        return f"source {source} ({self.sources[source].path.name}) {name}"

    def sample_of_file(self, name: str, index: int) -> tuple[int, int]:
        """(source, index) of sample `index` of released file `name`."""
        for s, source in enumerate(self.sources):
            reader = source.reader
            if reader is None or name not in {*reader.names, *(n for n, _ in reader.chunk_files())}:
                continue  # (megatron: the .idx or a .bin shard names the source)
            if source.format == "megatron":  # one sequence numbering over the .idx, whatever .bin holds it
                return s, index
            f = reader.names.index(name)
            if not 0 <= index < int(reader.starts[f + 1] - reader.starts[f]):
                raise UserError(f"file={name}: index={index} is outside its {reader.chunk_files()[f][1]} samples.")
            return s, int(reader.starts[f]) + index
        names = [n for source in self.sources if source.reader is not None for n in source.reader.names]
        raise UserError(f"file={name!r} is not a file of data.sources (they have: {', '.join(names[:8]) or 'none'}).")


def data_step_of(view: OrderView, command: DataCommand) -> int:
    given = [k for k in ("step", "data_step", "released_step") if getattr(command, k) is not None]
    if len(given) != 1:
        raise UserError("lit-open data show needs one of step=N (optimizer step), data_step=D or released_step=S.")
    if command.data_step is not None:
        return command.data_step
    if command.released_step is not None:
        if view.cfg.data.order == "mixture":
            raise UserError("released_step applies to a released order (data.order); give step= or data_step=.")
        if command.released_step < view.start:
            raise UserError(
                f"released_step={command.released_step} precedes this run's start, released step {view.start}."
            )
        return command.released_step - view.start
    log = Path(view.cfg.run.dir).expanduser() / "data_sequence"
    entries = read_data_sequence(log) if log.is_dir() else []
    kept = [e for e in entries if e["step"] == command.step and not ({"update_skipped", "undone", "skipped"} & set(e))]
    return kept[-1]["data_step"] if kept else command.step - 1


def show(view: OrderView, command: DataCommand, console: Console) -> dict[str, Any]:
    data_step = data_step_of(view, command)
    if data_step < 0:
        raise UserError(f"Global batch {data_step} does not exist: steps count from 1, data steps from 0.")
    batch = view.order.global_batch(data_step)
    released = f", released step {view.start + data_step:,}" if view.cfg.data.order != "mixture" else ""
    console.print(f"[bold]global batch {data_step:,}[/bold] ({len(batch)} samples{released})")
    shown = batch if command.samples == 0 else batch[: command.samples]
    rows = []
    for s, i in shown.tolist():
        text = view.text(s, i)
        rows.append({"source": s, "index": i, "file": view.sources[s].locate(i), "text": text})
        body = text[: command.chars] if text is not None else str(view.tokens(s, i)[:64].tolist())
        console.print(f"[cyan]{escape(view.where(s, i))}[/cyan]\n  {escape(repr(body))}")
    return {"data_step": data_step, "samples": batch.tolist(), "shown": rows}


def locate(view: OrderView, command: DataCommand, console: Console) -> dict[str, Any]:
    if command.contains is not None:
        return _search_text(view, command, console)
    if command.sample is not None:
        source, index = command.sample
        if not (0 <= source < len(view.sources) and 0 <= index < view.sources[source].samples):
            raise UserError(f"sample={command.sample}: no such sample (sources and their samples: see sources.json).")
    elif command.file is not None and command.index is not None:
        source, index = view.sample_of_file(command.file, command.index)
    else:
        raise UserError("lit-open data locate needs sample=[SOURCE,INDEX], file=NAME index=I, or contains=TEXT.")
    if view.cfg.data.order != "mixture":
        released = view.order.steps_of(source, index)
        data_steps = [r - view.start for r in released]
    else:
        first, last = _step_range(view, command)
        data_steps = []
        for data_step in range(first, last + 1):
            batch = view.order.global_batch(data_step)
            if np.any((batch[:, 0] == source) & (batch[:, 1] == index)):
                data_steps.append(data_step)
        released = []
    console.print(f"{escape(view.where(source, index))}: ", end="")
    if not data_steps:
        console.print("in no global batch" + (" of the order" if released == [] else ""))
    for k, data_step in enumerate(data_steps):
        where = f"released step {released[k]:,}" if released else ""
        before = " (before this run's start)" if data_step < 0 else ""
        console.print(f"global batch {data_step:,}{' ' + where if where else ''}{before}")
    return {"source": source, "index": index, "data_steps": data_steps, "released_steps": released}


def _step_range(view: OrderView, command: DataCommand) -> tuple[int, int]:
    first, last = command.steps if command.steps is not None else (0, view.cfg.trainer.max_steps - 1)
    end = view.order.data_steps
    last = min(last, end - 1) if end is not None else last
    if first < 0 or last < first:
        raise UserError(f"steps={command.steps}: give [FIRST,LAST] global batches with 0 <= FIRST <= LAST.")
    return first, last


def _search_text(view: OrderView, command: DataCommand, console: Console) -> dict[str, Any]:
    if view.tokenizer is None:
        raise UserError("contains= needs the run's tokenizer: set data.tokenizer=PATH/tokenizer.json.")
    first, last = _step_range(view, command)
    if last - first + 1 > CONTAINS_MAX_STEPS:
        raise UserError(
            f"steps=[{first},{last}] is {last - first + 1:,} global batches; search at most {CONTAINS_MAX_STEPS:,} "
            "per call (decoding every sample takes time)."
        )
    hits = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"searching {command.contains!r}", total=last - first + 1)
        for data_step in range(first, last + 1):
            for s, i in view.order.global_batch(data_step).tolist():
                if command.contains in view.text(s, i):
                    hits.append({"data_step": data_step, "source": s, "index": i, "file": view.sources[s].locate(i)})
                    console.print(f"global batch {data_step:,}: {escape(view.where(s, i))}")
            progress.advance(task)
    console.print(f"{len(hits)} sample(s) of global batches {first:,}-{last:,} contain {command.contains!r}")
    return {"hits": hits, "steps": [first, last]}


def data_command(args: list[str]) -> dict[str, Any]:
    action, command, overrides = parse(args)
    view = OrderView(load_config(overrides))
    console = Console()
    return show(view, command, console) if action == "show" else locate(view, command, console)
