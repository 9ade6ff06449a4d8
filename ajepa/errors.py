"""Errors that the CLI turns into a one-line message and a non-zero exit."""


class AjepaError(Exception):
    """A user-facing failure: bad input, bad parameters, missing files. One line, no traceback."""


class ConfigError(AjepaError):
    """A bad params.yaml key, type or value."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a stage. A KeyboardInterrupt, so that no `except Exception` on the way up
    swallows it; the CLI prints its one line and exits 128 + the signal's number, as a shell reports it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def first_line(e: BaseException) -> str:
    """`Type: first line of the message` of an exception from a library, for a one-line AjepaError."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
