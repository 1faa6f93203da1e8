"""Hugging Face directories pushed to a hub repo as branches, one after another in a background thread.

`check_push_access` refuses at start-up what would make every push fail (no token, offline mode). `HubPusher`
queues pushes in the order they are submitted and uploads them with huggingface_hub: the repo is created once (an
existing one is used as it is), the branch is created from the default branch when missing, and `upload_folder`
makes the branch hold exactly the directory's files. A failed push is retried with an exponential backoff; each
outcome is handed to a callback, in the worker thread. `push_plan` is what a dry run records instead of uploading.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lit_open.checkpoint.hub import hub_offline
from lit_open.errors import UserError, first_line

PROGRESS_EVERY_S = 30.0  # how often `drain` reports the pushes it still waits for


@dataclass
class Push:
    """One directory to push: the whole of `folder` becomes the files of `branch`."""

    folder: Path
    branch: str
    message: str  # the commit message
    step: int  # the optimizer step exported, for events


@dataclass
class Outcome:
    """How a push ended: `commit` and `url` when it was pushed, `error` when every attempt failed."""

    push: Push
    attempts: int
    seconds: float
    commit: str | None = None
    url: str | None = None
    error: str | None = None


def check_push_access(key: str) -> None:
    """Refuse a push to the hub that cannot succeed: no token, or huggingface_hub's offline mode."""
    # imported here: only a run that pushes needs huggingface_hub, and it loads an HTTP stack
    import huggingface_hub

    if hub_offline():
        raise UserError(
            f"{key} is set but HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) turns huggingface_hub's network access off, "
            "so no export could be pushed. Unset the variable, drop the option (local exports only), or set "
            "plugins.release.dry_run=true to record what would be pushed."
        )
    if huggingface_hub.get_token() is None:
        raise UserError(
            f"{key} is set but no Hugging Face token was found: set HF_TOKEN (a token with write access to the "
            "repo) or log in with `hf auth login`, or set plugins.release.dry_run=true to record what would be "
            "pushed without uploading."
        )


def push_plan(repo: str, push: Push) -> dict[str, Any]:
    """What `HubPusher` would push, as one JSON-able record (a dry run writes these)."""
    files = sorted(p.relative_to(push.folder).as_posix() for p in push.folder.rglob("*") if p.is_file())
    return {"repo": repo, "branch": push.branch, "step": push.step, "folder": str(push.folder), "files": files}


class HubPusher:
    """Pushes directories to the hub repo `repo` in one daemon thread, in submission order, retrying failures.

    `on_outcome` is called in the worker thread once per push, after its last attempt. `drain` waits for the queue.
    """

    def __init__(
        self,
        repo: str,
        *,
        private: bool,
        retries: int,
        backoff_s: float,
        on_outcome: Callable[[Outcome], None],
    ) -> None:
        self.repo = repo
        self.private = private
        self.retries = retries
        self.backoff_s = backoff_s
        self.on_outcome = on_outcome
        self.outcomes: list[Outcome] = []
        self.submitted = 0
        self._queue: deque[Push] = deque()
        self._changed = threading.Condition()  # guards the queue, the counts and the outcomes
        self._thread: threading.Thread | None = None
        self._repo_created = False

    def submit(self, push: Push) -> None:
        with self._changed:
            self._queue.append(push)
            self.submitted += 1
            self._changed.notify_all()
        if self._thread is None:
            # a daemon: a push still running when the bounded wait at the end gives up must not keep the process
            self._thread = threading.Thread(target=self._work, name="lit-open-hub-push", daemon=True)
            self._thread.start()

    def drain(self, timeout_s: float, report: Callable[[int, float], None]) -> bool:
        """Wait until every submitted push has ended, at most `timeout_s` seconds; True when none is left.

        `report(pending, waited_s)` is called at once and then every PROGRESS_EVERY_S while pushes are pending.
        """
        started = time.monotonic()
        deadline = started + timeout_s
        with self._changed:
            while self.submitted > len(self.outcomes):
                now = time.monotonic()
                if now >= deadline:
                    return False
                report(self.submitted - len(self.outcomes), now - started)
                self._changed.wait(min(PROGRESS_EVERY_S, deadline - now))
        return True

    def _work(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._queue)
                push = self._queue.popleft()
            outcome = self._push_with_retries(push)
            try:
                self.on_outcome(outcome)  # before it counts as ended: `drain` returns once its event is written
            finally:
                with self._changed:
                    self.outcomes.append(outcome)
                    self._changed.notify_all()

    def _push_with_retries(self, push: Push) -> Outcome:
        started = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            try:
                commit, url = self._push_once(push)
                return Outcome(push, attempts, time.monotonic() - started, commit=commit, url=url)
            except Exception as err:  # noqa: BLE001 - any failure is retried, then reported; training goes on
                error = f"{type(err).__name__}: {first_line(err)}"
            if attempts > self.retries:
                return Outcome(push, attempts, time.monotonic() - started, error=error)
            time.sleep(self.backoff_s * 2 ** (attempts - 1))

    def _push_once(self, push: Push) -> tuple[str, str]:
        # imported here: only a run that pushes needs huggingface_hub, and it loads an HTTP stack
        from huggingface_hub import HfApi

        api = HfApi()
        if not self._repo_created:
            api.create_repo(self.repo, private=self.private, exist_ok=True)
            self._repo_created = True
        api.create_branch(self.repo, branch=push.branch, exist_ok=True)  # from the default branch's head
        info = api.upload_folder(
            repo_id=self.repo,
            folder_path=push.folder,
            revision=push.branch,
            commit_message=push.message,
            # the branch holds exactly this export: files it inherited from the default branch (or an earlier push
            # of the same branch, e.g. more weight shards) go in the same commit; .gitattributes is always kept
            delete_patterns="*",
        )
        return info.oid, info.commit_url
