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
