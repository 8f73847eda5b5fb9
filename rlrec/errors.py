"""Errors a user can cause and fix: the CLI prints these as one clear message and exits non-zero, no traceback.

Anything else that escapes is a bug in rlrec and keeps its traceback.
"""

from __future__ import annotations


class RlrecError(Exception):
    """A user error: bad input file, bad config, missing path. The message says what and where."""


class ConfigError(RlrecError, ValueError):
    """A config file or override that does not fit the typed schema (unknown key, wrong type, bad value)."""


class DataError(RlrecError, ValueError):
    """An input data file that cannot be read as promised; the message names the file and line or key."""
