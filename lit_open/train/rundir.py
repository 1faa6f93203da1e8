"""One run per run directory: a launch either continues the run whose checkpoints `run.dir` holds, or starts a new
one there only once the earlier run's files are out of the way (moved aside intact, never deleted or mixed).

`checkpoints/` then only ever holds the current lineage (the checkpoints the resumed one descends from and those
written after it), so the checkpoint writer's retention can only delete checkpoints of this run, and `latest`
always names one of them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from lit_open.checkpoint.resumable import checkpoint_step, list_checkpoints, point_latest
from lit_open.config import TrainConfig
from lit_open.errors import UserError

SUPERSEDED = "superseded"  # <run.dir>/superseded/<UTC time>/: the files of runs that a fresh start moved aside


@dataclass
class Start:
    """Where this launch starts: the checkpoint it resumes (None: from scratch), and the earlier files that must move
    aside for it (`move_aside` does it, once every check of the launch has passed)."""

    resume_path: Path | None
    moves: tuple[Path, ...] = ()  # files and directories to move ...
    moved_to: Path | None = None  # ... into this new directory

    def move_aside(self, run_dir: Path) -> None:
        """Move the earlier files (on global rank 0 only) and point `latest` at the checkpoint to resume."""
        if not self.moves:
            return
        self.moved_to.mkdir(parents=True)
        for path in self.moves:
            os.replace(path, self.moved_to / path.name)
        if self.resume_path is not None and self.resume_path.parent == run_dir / "checkpoints":
            point_latest(self.resume_path.parent, self.resume_path)


def choose_start(cfg: TrainConfig, run_dir: Path, resume_path: Path | None) -> Start:
    """What must move aside so that the run directory holds one lineage when this launch resumes `resume_path`
    (`find_resume_checkpoint` under `cfg.resume`; None: a new run); every process decides the same, nothing is
    moved yet."""
    checkpoints = run_dir / "checkpoints"
    existing = list_checkpoints(checkpoints)
    if resume_path is not None and resume_path.resolve().parent == checkpoints.resolve():
        resume_path = checkpoints / resume_path.name
        newer = tuple(p for p in existing if checkpoint_step(p) > checkpoint_step(resume_path))
        # resuming an earlier checkpoint of this run starts a new branch: the later ones must not be mixed into it
        return Start(resume_path, newer, _aside(run_dir) / "checkpoints" if newer else None)
    if existing and not cfg.move_aside:  # a new run (from scratch, init_from or another run's checkpoint)
        raise UserError(_occupied_message(cfg, run_dir, existing, resume_path))
    # with no checkpoint (or with move_aside=true) the earlier files cannot be continued: they are kept, apart
    leftovers = tuple(
        sorted(p for p in run_dir.iterdir() if p.name != SUPERSEDED and not p.name.startswith("."))
        if run_dir.is_dir()
        else ()
    )
    return Start(resume_path, leftovers, _aside(run_dir) if leftovers else None)


def _aside(run_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = run_dir / SUPERSEDED / stamp
    n = 1
    while path.exists():
        n += 1
        path = run_dir / SUPERSEDED / f"{stamp}-{n}"
    return path


def _occupied_message(cfg: TrainConfig, run_dir: Path, existing: list[Path], resume_path: Path | None) -> str:
    steps = ", ".join(str(checkpoint_step(p)) for p in existing[-3:])
    what = (
        f"resume={cfg.resume} would start a new run"
        if resume_path is None
        else f"resume={resume_path} (another run's checkpoint) would start another lineage"
    )
    return (
        f"run.dir={str(run_dir)!r} holds the checkpoints of an earlier run ({len(existing)}, newest at steps "
        f"{steps}), and {what} there, whose checkpoints would mix with them. To continue that run: resume=auto. "
        "To start a new run: give another run.dir, or add move_aside=true to move the earlier run's files to "
        f"{run_dir / SUPERSEDED}/TIME/ first (nothing is deleted)."
    )
