"""Errors a user can cause: a bad path, file, config value or checkpoint.

The CLI prints a `UserError` as one line (what was wrong and what to do) and exits with status 2;
anything else is an internal bug and keeps its traceback. Subclasses say where the problem lies.
`UserError` derives from ValueError so that library callers catching ValueError keep working.
"""
from __future__ import annotations


class UserError(ValueError):
    """Something the user gave us is wrong; the message names it and says what to do."""


class DatasetError(UserError):
    """A dataset path or file the user pointed us at is unusable."""
