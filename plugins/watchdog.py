"""watchdog: turns a hang into a restart with evidence. A thread on every rank watches the training loop's progress;
when a step makes none for longer than its limit, each rank writes the Python stacks of all its threads to
`<run.dir>/hangs/`, global rank 0 writes a `hang` event naming the step and the ranks that did not arrive where the
others wait, and every process exits with status 124 so that the scheduler can restart the run (resume=auto). It
also turns on NCCL's flight recorder. Design and options: docs/plugins/watchdog.md; `lit-open list plugins`.
"""

from __future__ import annotations

import faulthandler
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from lit_open import glue
from lit_open.errors import EXIT_HUNG, UserError
from lit_open.plugin import Plugin, RunState, option

# Progress stages within a micro-batch, in the order training reaches them; a rank whose (data step, micro-batch,
# stage) is behind the others' when a hang is found did not arrive where they wait.
STAGES = ("batch_start", "backward", "optimizer_step", "step_end")
REPORTED = "reported"  # the file global rank 0 writes once the hang event is out: the other ranks may exit
# Flight recorder of torch's NCCL process groups: a ring of the recent collectives per rank, dumped to
# TORCH_FR_DUMP_TEMP_FILE<rank> when a collective times out (read them with `torchfrtrace`)
NCCL_FLIGHT_RECORDER = {"TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}


class Watchdog(Plugin):
    """Finds a step without progress; stacks of every rank to hangs/, a `hang` event, exit status 124."""

    name = "watchdog"

    @dataclass
    class Config:
        timeout_s: float = option(600.0, "a training step without progress for this long is a hang")
        median_factor: float = option(
            0.0, "also a hang: no progress for this many times the median recent step (0: off), if sooner"
        )
        min_timeout_s: float = option(60.0, "the median rule never declares a hang sooner than this")
        first_step_timeout_s: float = option(1800.0, "the allowance until the first step of a session ends")
        activity_timeout_s: float = option(
            3600.0, "the allowance for a checkpoint save, a validation or an in-loop evaluation"
        )
        report_wait_s: float = option(10.0, "how long global rank 0 waits for the other ranks' stacks")
        nccl_flight_recorder: bool = option(
            True, "record recent NCCL collectives and dump them to hangs/ on a collective timeout"
        )

        def __post_init__(self) -> None:
            for key in ("timeout_s", "min_timeout_s", "first_step_timeout_s", "activity_timeout_s"):
                if not getattr(self, key) > 0:  # also refuses nan
                    raise UserError(
                        f"plugins.watchdog.{key}={getattr(self, key)} must be a positive number of seconds."
                    )
            if not (self.median_factor == 0 or self.median_factor > 1):
                raise UserError(
                    f"plugins.watchdog.median_factor={self.median_factor} must be 0 (off) or above 1 (e.g. 10: a step "
                    "ten times slower than the median is a hang)."
                )
            if not self.report_wait_s >= 0:
                raise UserError(f"plugins.watchdog.report_wait_s={self.report_wait_s} must be 0 or more seconds.")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._marker = (-1, 0, 0)  # (data step, micro-batch, stage) reached last on this rank
        self._last_progress = time.monotonic()
        self._step = 0  # the optimizer steps applied
        self._first_step_done = False
        self._step_end = 0.0  # time.monotonic() at the latest step end
        self._durations: list[float] = []  # recent steps' seconds, from one step's end to the next
        self._interrupted = False  # an activity (checkpoint, validation, eval) came between two step ends
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dir: Path | None = None
        self._rank = 0
        self._world_size = 1
        self._nccl = False  # the default process group is NCCL's: its flight record goes with the stacks

    def bind(self, run: RunState) -> None:
        super().bind(run)
        # read when a process group is created, which is after this in every process of a run
        if self.cfg.nccl_flight_recorder and run.run_dir is not None:
            for key, value in NCCL_FLIGHT_RECORDER.items():
                os.environ.setdefault(key, value)
            os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", str(run.run_dir / "hangs" / "nccl_trace_rank_"))

    # -- progress, from the training loop (main thread) ------------------------------------------------------
    def _progress(self, data_step: int, micro: int, stage: str) -> None:
        self._marker = (data_step, micro, STAGES.index(stage))
        self._last_progress = time.monotonic()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._progress(batch["data_step"], batch["micro"], "batch_start")

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._progress(*self._marker[:2], "backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._progress(*self._marker[:2], "optimizer_step")

    def on_step_end(self, trainer, pl_module, step: int) -> None:
        now = time.monotonic()
        if self._first_step_done and not self._interrupted:
            self._durations = [*self._durations[-49:], now - self._step_end]
        self._step_end, self._interrupted, self._first_step_done, self._step = now, False, True, step
        self._progress(*self._marker[:2], "step_end")

    # -- the watching thread -------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self._rank, self._world_size = trainer.global_rank, trainer.world_size
        self._nccl = dist.is_initialized() and dist.get_backend() == "nccl"
        self._step, self._first_step_done, self._durations = trainer.global_step, False, []
        # one directory per session, named alike on every rank
        session = trainer.strategy.broadcast(time.strftime("%Y%m%d-%H%M%S"))
        self._dir = self.run.run_dir / "hangs" / f"{session}-step-{trainer.global_step:08d}"
        self._last_progress = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, args=(trainer, pl_module), daemon=True, name="watchdog")
        self._thread.start()

    def on_train_end(self, trainer, pl_module) -> None:
        self._halt()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._halt()

    def _halt(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def limit(self) -> tuple[str, float]:
        """What is in progress now and how long it may go without progress."""
        activity = self.run.activity
        if activity is not None:
            return activity[0], self.cfg.activity_timeout_s
        if not self._first_step_done:
            return "first_step", self.cfg.first_step_timeout_s
        limit = self.cfg.timeout_s
        if self.cfg.median_factor and len(self._durations) >= 5:
            by_median = self.cfg.median_factor * statistics.median(self._durations)
            limit = min(limit, max(self.cfg.min_timeout_s, by_median))
        return "step", limit

    def _watch(self, trainer, pl_module) -> None:
        seen_activity = None
        while not self._stop.wait(min(1.0, self.cfg.min_timeout_s / 20)):
            activity = self.run.activity
            if activity != seen_activity:  # an activity began or ended: that is progress
                self._last_progress = max(self._last_progress, time.monotonic())
                seen_activity = activity
            if activity is not None:
                self._interrupted = True  # the step holding it is not a training step's duration
            what, limit = self.limit()
            start = max(self._last_progress, activity[1]) if activity is not None else self._last_progress
            stalled = time.monotonic() - start
            if stalled > limit:
                self._hang(trainer, pl_module, what, limit, stalled)
                return

    def _hang(self, trainer, pl_module, what: str, limit: float, stalled: float) -> None:
        """Write this rank's stacks and report; rank 0 writes the event; every rank exits with EXIT_HUNG."""
        self._dir.mkdir(parents=True, exist_ok=True)
        stacks = self._dir / f"rank-{self._rank:05d}.txt"
        with open(stacks, "w") as f:
            f.write(
                f"# rank {self._rank}: no progress for {stalled:.1f} s in {what} (limit {limit:.1f} s) after step "
                f"{self._step}, at data step {self._marker[0]}, micro-batch {self._marker[1]}, "
                f"{STAGES[self._marker[2]]}\n"
            )
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
        if self._nccl:  # the collectives in flight, before NCCL's own timeout (if ever) dumps them
            (self._dir / f"nccl_trace_rank_{self._rank}").write_bytes(glue.nccl_flight_record())
        report = {"rank": self._rank, "marker": list(self._marker), "step": self._step, "what": what}
        (self._dir / f"rank-{self._rank:05d}.json").write_text(json.dumps(report))
        if self._rank == 0:
            self._report(trainer, pl_module, what, limit, stalled)
        else:
            deadline = time.monotonic() + self.cfg.report_wait_s + 30
            while not (self._dir / REPORTED).exists() and time.monotonic() < deadline:
                time.sleep(0.2)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(EXIT_HUNG)  # the main thread is stuck: nothing else can end the process

    def _report(self, trainer, pl_module, what: str, limit: float, stalled: float) -> None:
        deadline = time.monotonic() + self.cfg.report_wait_s
        reports: dict[int, dict] = {}
        while True:
            for path in self._dir.glob("rank-*.json"):
                report = json.loads(path.read_text())
                reports[report["rank"]] = report
            if len(reports) == self._world_size or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        markers = {rank: tuple(r["marker"]) for rank, r in reports.items()}
        silent = sorted(set(range(self._world_size)) - set(reports))
        behind = sorted(r for r, m in markers.items() if m < max(markers.values()))
        not_arrived = sorted(set(behind) | set(silent))
        self.log_event(
            trainer,
            pl_module,
            "hang",
            in_step=self._step + 1,
            waiting_in=what,
            seconds=round(stalled, 1),
            limit_s=round(limit, 1),
            not_arrived=not_arrived,
            no_report=silent,
            where={str(r): f"data step {m[0]}, micro-batch {m[1]}, {STAGES[m[2]]}" for r, m in sorted(markers.items())},
            stacks=str(self._dir),
        )
        who = (
            f"ranks that did not arrive where the others wait: {', '.join(map(str, not_arrived))}"
            if not_arrived
            else "every rank stopped at the same point"
        )
        print(
            f"lit-open: step {self._step + 1} hung: no progress for {stalled:.0f} s in {what} (plugins.watchdog limit "
            f"{limit:.0f} s); {who}. Stacks of every thread of every rank: {self._dir}. Exiting with status "
            f"{EXIT_HUNG}; resume=auto continues from the newest checkpoint.",
            file=sys.stderr,
            flush=True,
        )
        (self._dir / REPORTED).write_text("")
