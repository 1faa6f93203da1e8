"""A plugin that exercises every hook of the plugin API, for tests."""

from dataclasses import dataclass, field, replace

import torch

from lit_open.plugin import Plugin, Rollback, SnapshotPolicy


class Recorder(Plugin):
    """Records the hooks it sees; can turn on QK-norm, add a loss term and skip chosen steps."""

    name = "recorder"

    @dataclass
    class Config:
        skip_at: list[int] = field(default_factory=list)  # global batches (data steps) whose update is skipped
        extra_loss: float = 0.0
        qk_norm: str | None = None

    def __init__(self, **options):
        super().__init__(**options)
        self.calls: list[str] = []
        self.model = None
        self.before_skip = None
        self.unchanged_by_skip: list[bool] = []

    def configure_model(self, model_config):
        self.calls.append("configure_model")
        return replace(model_config, qk_norm=self.cfg.qk_norm) if self.cfg.qk_norm else model_config

    def on_model_built(self, model):
        self.calls.append("on_model_built")
        self.model = model

    def loss_terms(self, outputs):
        if not self.cfg.extra_loss:
            return {}
        return {"extra": self.cfg.extra_loss * outputs.logsumexp.pow(2).mean()}  # a z-loss

    def skip_step(self, metrics):
        self.calls.append(f"skip_step:{metrics['step']}")
        if metrics["data_step"] in self.cfg.skip_at:
            self.before_skip = [p.detach().clone() for p in self.model.parameters()]
            return True
        return False

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.before_skip is not None:
            self.unchanged_by_skip.append(
                all(torch.equal(a, b) for a, b in zip(self.before_skip, self.model.parameters()))
            )
            self.log_event(trainer, pl_module, "skip", reason="test")
            self.before_skip = None

    def state_dict(self):
        return {"calls": len(self.calls)}

    def load_state_dict(self, state):
        self.calls.append(f"restored:{state['calls']}")


class SlowSave(Plugin):
    """Makes every synchronous checkpoint save take `seconds` longer (a slow file system)."""

    name = "slow_save"

    @dataclass
    class Config:
        seconds: float = 2.5

    def on_checkpoint_written(self, trainer, pl_module, step, tmp):
        import time  # only this test plugin sleeps

        time.sleep(self.cfg.seconds)


class RollbackAt(Plugin):
    """Asks once, before update `at`, to roll back to step `to` and go on with the global batch after `at`'s."""

    name = "rollback_at"

    @dataclass
    class Config:
        at: int = 5
        to: int = 2

    def __init__(self, **options):
        super().__init__(**options)
        self.done = False

    def snapshot_policy(self):
        return SnapshotPolicy(every=self.cfg.to, horizon=self.cfg.at)

    def rollback(self, metrics):
        if self.done or metrics["step"] != self.cfg.at:
            return None
        self.done = True
        return Rollback(to_step=self.cfg.to, resume_data_step=int(metrics["data_step"]) + 1, reason="test")
