"""Errors a user can cause: a bad path, file, config value or checkpoint.

The CLI prints a `UserError` as one line (what was wrong and what to do) and exits with status 2;
anything else is an internal bug and keeps its traceback. Subclasses say where the problem lies.
`UserError` derives from ValueError so that library callers catching ValueError keep working.
They live in core/, below every other package, so that every layer can raise them (kernels report
bad arguments as plain ValueError: they have no users, only callers).
"""
from __future__ import annotations


class UserError(ValueError):
    """Something the user gave us is wrong; the message names it and says what to do."""


class ConfigError(UserError):
    """A config file, key or value the user gave is wrong (the message names the key)."""


class DatasetError(UserError):
    """A dataset path or file the user pointed us at is unusable."""


class CheckpointError(UserError):
    """A checkpoint file that is missing, truncated, not ours or of another kind; the caller says
    what to do."""


class ShardError(DatasetError):
    """A shard of a `data.backend: stream` data set that is missing or cannot be read (the message
    names it); the fix is to write the shards again (`simmim shard`), not to rescan the images."""
    needs_scan = False
