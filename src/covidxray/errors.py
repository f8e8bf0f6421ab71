"""What the user can fix, told apart from bugs.

``UserError`` and its kinds are what the command line prints as one line (the file, the
setting or the input, and what to do): a file that cannot be read, a run that is not complete,
a setting out of range, an optional extra not installed. Anything else raised is a bug in
covidxray or a library: the command line says so and shows its traceback under ``-v``.
"""

from __future__ import annotations


class UserError(Exception):
    """An input, file or setting that cannot be used; the message names it and says why."""


class ConfigError(UserError, ValueError):
    """A setting out of its range or of the wrong kind (named, with the range allowed)."""


class MissingExtraError(UserError, ImportError):
    """An optional part of covidxray whose packages are not installed."""

    def __init__(self, what: str, extra: str):
        self.extra = extra
        super().__init__(f"{what} needs the {extra!r} extra: pip install 'covidxray[{extra}]'")


def require(module: str, what: str, extra: str):
    """``import module``, or ``MissingExtraError`` naming the extra that installs it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(what, extra) from error
