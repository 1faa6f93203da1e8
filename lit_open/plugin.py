"""The plugin API: a Lightning Callback with lit-open hooks that LitLM calls at the right moments.

A plugin is one module in `plugins/` (shipped as `lit_open.plugins`), one test file and one page in
`docs/plugins/`. Its options are its nested `Config` dataclass, declared with `option(default, help)`: the one place
its defaults are stated. `plugins.<name>.<option>=value` is checked against it at start-up, so a typo fails before
the first step. Plugins installed under the entry-point group `lit_open.plugins` (the built-in ones and third-party
packages alike) are selectable as `plugins=[name]`. docs/architecture.md lists every hook and when it is called.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from hydra.utils import get_class
from lightning.pytorch import Callback, LightningModule, Trainer

from lit_open.compose import plugin_entry_points
from lit_open.errors import UserError
from lit_open.train.events import EventLog
from lit_open.typed import to_typed

if TYPE_CHECKING:
    from lit_open.config import SourceConfig, TrainConfig
    from lit_open.model import ModelConfig, Transformer


def option(default: Any = MISSING, help: str = "") -> Any:
    """A `Config` field with its default and a one-line help (shown by `lit-open list plugins`).

    Mutable defaults (lists, dicts) are copied for every instance.
    """
    metadata = {"help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunState:
    """What a run knows about itself, shared by LitLM, the core callbacks and the plugins (as `Plugin.run`).

    LitLM updates it; plugins read it. Counters are this process's view, equal on every rank.
    """

    config: TrainConfig
    run_dir: Path | None  # None: not a training run (e.g. `lit-open eval`)
    events: EventLog  # events.jsonl (written by global rank 0)
    tokens_per_batch: int  # tokens of one global batch (data.global_batch_size x data.seq_len)
    data_parallel_size: int = 1
    context_parallel_size: int = 1  # processes that share each sequence (strategy.context_parallel_size)
    tensor_parallel_size: int = 1
    data_parallel_rank: int = 0  # this process's rank among the data-parallel replicas (known once fit starts)
    consumed_batches: int = 0  # the data position: global batches consumed (trained, skipped or jumped over)
    skipped_updates: int = 0  # updates skipped by a plugin's skip_step
    # the plugins (names, config order) whose skip_step asked on this process to skip the latest skipped update;
    # empty when only another rank's asked
    skipped_by: tuple[str, ...] = ()
    rollbacks: int = 0
    train_seconds: float = 0.0  # time spent in training steps this session (validation excluded)
    # train/loss, val/loss and eval/* values by optimizer step, for the summary and plugins
    history: dict[str, list[tuple[int, float]]] = field(default_factory=lambda: {"train/loss": [], "val/loss": []})
    last_metrics: dict[str, float] = field(default_factory=dict)  # the newest value of every logged metric
    # set when the run stops early (stop signal, trainer.time_limit): the `stop` event's fields
    stopped: dict[str, Any] | None = None
    # long work in progress between or inside optimizer steps that is not training: (what, time.monotonic() at its
    # start), e.g. ("checkpoint", t), ("validation", t), ("lm_eval", t); None while training. Set with `busy`.
    activity: tuple[str, float] | None = None

    @contextmanager
    def busy(self, what: str) -> Iterator[None]:
        """Mark `what` as in progress for the duration of the block (a hang watchdog allows it more time)."""
        previous, self.activity = self.activity, (what, time.monotonic())
        try:
            yield
        finally:
            self.activity = previous

    @property
    def tokens_seen(self) -> int:
        """Tokens of the global batches consumed so far."""
        return self.consumed_batches * self.tokens_per_batch

    @property
    def checkpoint_dir(self) -> Path | None:
        """Where resumable checkpoints are written (`<run.dir>/checkpoints/`)."""
        return self.run_dir / "checkpoints" if self.run_dir is not None else None


@dataclass
class StepOutputs:
    """What `loss_terms` sees for one micro-batch."""

    loss: torch.Tensor  # the cross-entropy of this micro-batch (a scalar with grad)
    logsumexp: torch.Tensor  # (batch * seq,) float32 log-partition of each token's logits, with grad (z-loss)
    batch: dict[str, Any]  # input_ids, targets, data_step, micro, ...


@dataclass
class SnapshotPolicy:
    """How often LitLM keeps an in-memory snapshot of the training state, and how far back one must reach."""

    every: int  # optimizer steps between snapshots (one is also taken when training starts or resumes)
    horizon: int  # a rollback may target any step up to this many steps before the current one


@dataclass
class Rollback:
    """A plugin's request (from `Plugin.rollback`) to return to an earlier state and go on with later data."""

    to_step: int  # restore the newest snapshot taken at or before this optimizer step
    resume_data_step: int  # the next global batch trained on; untrained ones before it are skipped for good
    reason: str  # one line, for the log and events.jsonl
    escalate: tuple[str, ...] = ()  # features other plugins should switch on from now on (e.g. "qk_norm")
    requested_by: str = ""  # the requesting plugin's name


@dataclass
class RolledBack:
    """What a rollback did, as passed to `on_rollback`."""

    request: Rollback
    from_step: int  # optimizer steps applied before the rollback
    to_step: int  # optimizer steps applied after it: the restored snapshot's
    undone: tuple[int, int]  # data steps [first, end) whose updates were undone (trained, then rolled back)
    skipped: tuple[int, int]  # data steps [first, end) jumped over: never trained


@dataclass
class DataPhase:
    """A change of the training mixture that a plugin declares before training (from `Plugin.data_phases`)."""

    start: int  # the first global batch (data step) drawn from this mixture
    sources: list[SourceConfig]  # prepared sources and their weights, as in data.sources
    key: str  # the config key they come from, for error messages (e.g. "plugins.anneal.sources")


class Plugin(Callback):
    """Base class of lit-open plugins. Override only the hooks you need; all of them default to no-ops.

    Besides Lightning's callback hooks (which receive the Trainer and LitLM), a plugin may use: `self.cfg` (its typed
    `Config`), `self.run` (the RunState), `pl_module.model` (the Transformer, possibly sharded),
    `pl_module.device_mesh` (Lightning's, under fsdp/tp/fsdp_tp) and `pl_module.log_row(row)`.
    """

    name = "plugin"  # the plugin's name in configs and in events.jsonl

    @dataclass
    class Config:
        pass

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.cfg = to_typed(type(self).Config, options, "plugin", prefix=f"plugins.{self.name}.")
        self._run: RunState | None = None

    def bind(self, run: RunState) -> None:
        """Called by LitLM when it is built: the run state this plugin reads from then on."""
        self._run = run

    @property
    def run(self) -> RunState:
        if self._run is None:
            raise RuntimeError(f"plugin {self.name!r} has no run state yet: LitLM binds it when it is built")
        return self._run

    def configure_model(self, model_config: ModelConfig) -> ModelConfig:
        """Called before the model is built; return the (possibly changed) architecture."""
        return model_config

    def on_model_built(self, model: Transformer) -> None:
        """Called after the model is built, before it is parallelized or handed to the optimizer."""

    def new_parameters(self) -> list[str]:
        """Names (as in `model.named_parameters()`) of parameters this plugin added to the architecture.

        A checkpoint written before the plugin was used lacks them; resuming it keeps their fresh values (and gives
        them fresh optimizer state) instead of failing on the missing keys.
        """
        return []

    def data_phases(self, config: TrainConfig) -> list[DataPhase]:
        """Mixtures the run switches to at given global batches, declared before training starts.

        Declared up front, a switch is part of the data order: which samples form global batch s is still a pure
        function of s, so a resumed run and a run on another number of processes see the same batches. A source
        used before and after a switch continues its stream where it was.
        """
        return []

    def loss_terms(self, outputs: StepOutputs) -> dict[str, torch.Tensor]:
        """Extra scalar terms added to the loss of a micro-batch; each is logged as `train/<name>`."""
        return {}

    def skip_step(self, metrics: dict[str, float]) -> bool:
        """Asked before each optimizer step; True on any rank skips the update on all ranks.

        metrics: step (the update this would be; after a skip the next batch asks for the same step again),
        data_step (the global batch the gradients come from), loss, grad_norm (before clipping), lr.
        """
        return False

    def lr_multiplier(self, step: int, data_step: int) -> float:
        """A factor on the scheduled LR of update `step` (computed on global batch `data_step`); 1.0 leaves it.

        The factors of all plugins multiply; the LR logged for the step is the one applied. The schedule itself is
        untouched: the next update gets its scheduled LR unless a plugin scales that one too.
        """
        return 1.0

    def rollback(self, metrics: dict[str, float]) -> Rollback | None:
        """Asked before each optimizer step, with the same metrics as `skip_step`: a `Rollback` to undo updates.

        The request of global rank 0 is the one carried out, on every rank (if any rank asks, rank 0's answer is
        broadcast; all ranks see the same reduced metrics, so they normally agree). The step being asked about is
        not applied. LitLM then restores the snapshot, moves the data position forward to `resume_data_step`,
        moves checkpoints written after the restored step to `checkpoints/rolled-back/`, writes a `rollback`
        event and calls `on_rollback` on every callback. A plugin that may ask must declare a `snapshot_policy`.
        """
        return None

    def snapshot_policy(self) -> SnapshotPolicy | None:
        """The in-memory snapshots this plugin's rollbacks need; the trainer keeps the union of all policies."""
        return None

    def on_rollback(self, trainer: Trainer, pl_module: LightningModule, rolled_back: RolledBack) -> None:
        """Called on every rank after a rollback has restored the state (also for other plugins' requests)."""

    def step_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Extra columns for the metrics row of the optimizer step just applied (not called for skipped ones).

        Called on every rank right after the update and the LR schedule's step, so it may run collectives; the
        values of global rank 0 are logged, in the same row as train/loss.
        """
        return {}

    def on_step_end(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        """Called on every rank exactly once after every applied optimizer update, `step` being its number.

        It comes after the LR schedule's step and after the update's metrics row was logged (`self.run.last_metrics`
        holds it), core callbacks first (progress, checkpoint writer: the step's checkpoint, when due, is on disk),
        then plugins in config order. Not called for a skipped update; after a rollback, steps are numbered again
        from the restored one.
        """

    def on_checkpoint_written(self, trainer: Trainer, pl_module: LightningModule, step: int, tmp: Path) -> None:
        """Called on every rank once this rank's part of the checkpoint of `step` is on disk under its temporary
        name `tmp`, before it is made visible: in the main thread for a synchronous save (after every rank's part is
        written), in the checkpoint writer's thread for an asynchronous one (checkpoint.asynchronous), where it must
        not touch training state or run collectives."""

    def on_checkpoint_saved(self, trainer: Trainer, pl_module: LightningModule, step: int, path: Path) -> None:
        """Called on every rank once the resumable checkpoint of `step` is complete at `path` and `latest` names it."""

    def log_event(self, trainer: Trainer, pl_module: LightningModule, event: str, **fields: Any) -> None:
        """Record what the plugin did in events.jsonl (written by global rank 0)."""
        self.run.events.write(trainer.global_step, event, plugin=self.name, **fields)


def build_plugins(plugins_cfg: dict[str, Any]) -> list[Plugin]:
    """Instantiate the selected plugins from `plugins.<name>` blocks, in config order."""
    plugins = []
    for key, spec in (plugins_cfg or {}).items():
        # a recipe may configure a plugin the user deselected with plugins=[...]: its block has no _target_
        if not isinstance(spec, dict) or "_target_" not in spec:
            continue
        options = {k: v for k, v in spec.items() if k != "_target_"}
        try:
            cls = get_class(spec["_target_"])
        except Exception as err:
            raise UserError(
                f"plugins.{key}._target_={spec['_target_']!r} cannot be imported ({err}). Installed plugins: "
                f"{', '.join(sorted(plugin_entry_points())) or 'none'}."
            ) from None
        if not (isinstance(cls, type) and issubclass(cls, Plugin)):
            raise UserError(f"plugins.{key}._target_={spec['_target_']!r} is not a lit_open.plugin.Plugin subclass.")
        plugins.append(cls(**options))
    return plugins
