"""The project's user-facing errors: what a user can fix (a config value, a flag, a name, a path, a
run another command holds). The CLI prints these as one line and exits with status 2; every other
exception is a bug or an outage and keeps its traceback.

Each subclasses the builtin a caller would expect (`InputError` is a `ValueError`, `NotFoundError` a
`FileNotFoundError`), so `except ValueError` around a call still works.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message names the key, flag, file or run at fault."""


class InputError(UserError, ValueError):
    """A bad value: a config key, a flag, a name, a file's contents."""


class NotFoundError(UserError, FileNotFoundError):
    """A run, file, folder or object the user named is not there."""


def user_errors() -> tuple[type[Exception], ...]:
    """What the CLI reports as one line (exit 2): ours, and a pydantic model's validation error
    (it names the field)."""
    from pydantic import ValidationError

    return (UserError, ValidationError)
