"""The resume-aware CSV logger: only global rank 0 ever reads or rewrites metrics.csv."""

from lightning.fabric.utilities import rank_zero as fabric_rank_zero
from lightning.pytorch.utilities import rank_zero as pytorch_rank_zero

from lit_open.glue import resuming_csv_logger as ResumingCSVLogger

HISTORY = "step,train/loss\n1,2.0\n5,1.0\n"


def test_other_ranks_never_touch_metrics_csv(tmp_path, monkeypatch):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "metrics.csv").write_text(HISTORY)
    for module in (fabric_rank_zero, pytorch_rank_zero):
        monkeypatch.setattr(module.rank_zero_only, "rank", 1)
    for keep_through in (None, 1):  # a fresh run would delete it, a resumed one trim it: on rank 0 only
        _ = ResumingCSVLogger(tmp_path, keep_through=keep_through, name="logs", version="").experiment
    assert (logs / "metrics.csv").read_text() == HISTORY


def test_rank_zero_trims_the_history_to_the_resumed_step(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "metrics.csv").write_text(HISTORY)
    _ = ResumingCSVLogger(tmp_path, keep_through=1, name="logs", version="").experiment
    assert (logs / "metrics.csv").read_text().splitlines() == ["step,train/loss", "1,2.0"]


def test_monotonic_steps_share_a_step_per_optimizer_step_and_continue_after_a_rollback():
    from types import SimpleNamespace

    from lit_open.train.loggers import MonotonicSteps

    steps = MonotonicSteps()
    # a validation row at step 3 after its train row; a rollback from 5 back to 2 (steps 3-5 again); a replay
    logged = [steps(s) for s in (0, 1, 2, 3, 3, 4, 5, 3, 4, 5, 6)]
    assert logged == [0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9]

    class Client:  # an MLflow run's history of trainer/global_step: (MLflow step, optimizer step)
        def get_metric_history(self, run_id, key):
            return [SimpleNamespace(step=s, value=float(v)) for s, v in zip(logged, (0, 1, 2, 3, 3, 4, 5, 3, 4, 5, 6))]

    resumed = MonotonicSteps.continuing(Client(), "run")  # a resumed run replays steps after its checkpoint (4)
    assert [resumed(s) for s in (5, 6, 7)] == [10, 11, 12]
