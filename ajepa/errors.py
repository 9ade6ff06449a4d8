"""Errors that the CLI turns into a one-line message and a non-zero exit."""


class AjepaError(Exception):
    """A user-facing failure: bad input, bad parameters, missing files. One line, no traceback."""


class ConfigError(AjepaError):
    """A bad params.yaml key, type or value."""
