"""The error a user can fix: every command prints it as one line, never as a traceback.

Raise `UserError` (or a subclass) when the message alone tells the user what is wrong and
what to do: a file or setting named, the fix suggested. `realm_jax.cli` turns it, and the
built-in errors that mean the same (`cli.USER_ERRORS`), into `error: <message>` and exit
status 1. Library callers catch it like any exception.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message names what and how, on one line."""
