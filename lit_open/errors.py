"""Errors that are the user's to fix (the CLI prints them as one paragraph and exits with status 2), and the early
ends of a training run with their exit statuses."""


class UserError(Exception):
    """A problem with the user's input (config, path, checkpoint), with a message that says what to do.

    The message names the bad key, path or value and what would be accepted. The CLI prints it without a
    traceback (set LIT_OPEN_DEBUG=1 to see one) and exits with status 2.
    """


def check_choice(key: str, value: object, choices: tuple[str, ...]) -> None:
    """Refuse a config value outside `choices`, naming the key and what is accepted."""
    if value not in choices:
        raise UserError(f"{key}={value!r} is not supported; choose one of: {', '.join(choices)}.")


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), for one-paragraph errors."""
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""


EXIT_STOPPED = (
    75  # EX_TEMPFAIL: stopped early with a checkpoint (stop signal, trainer.time_limit); resume=auto continues
)
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT
EXIT_HUNG = 124  # the watchdog plugin found a hang (as `timeout` reports one); resume=auto continues


class RunStopped(Exception):
    """The run stopped early on a stop signal or its time limit, with a checkpoint (exit status EXIT_STOPPED)."""


class RunInterrupted(BaseException):
    """Ctrl-C during training. A BaseException, so that nothing on the way catches it as an error, and not a
    KeyboardInterrupt, which Lightning turns into exit status 1 (lit_open.train.stopping)."""
