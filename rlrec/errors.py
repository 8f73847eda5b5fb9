"""Errors a user can cause and fix: the CLI prints these as one clear message and exits non-zero, no traceback.

Anything else that escapes is a bug in rlrec and keeps its traceback.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable


class RlrecError(Exception):
    """A user error: bad input file, bad config, missing path. The message says what and where."""


class ConfigError(RlrecError, ValueError):
    """A config file or override that does not fit the typed schema (unknown key, wrong type, bad value)."""


class DataError(RlrecError, ValueError):
    """An input data file that cannot be read as promised; the message names the file and line or key."""


class Stopped(Exception):
    """SIGTERM, raised in the main thread so that a stopped command ends like an interrupted one."""


def _stop(signum, _frame) -> None:
    raise Stopped(signal.Signals(signum).name)


def run_reporting_errors(command: Callable[[], object]) -> int:
    """Run a command and return its exit code: 0; 2 with one line for a user's error (RlrecError, or a file or
    folder that cannot be read or written: the path and the reason); 130 / 143 with one line when SIGINT / SIGTERM
    stop it (what was checkpointed stays resumable). A bug keeps its traceback."""
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        command()
    except RlrecError as err:
        print(f"rlrec: error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Stopped) as err:
        name = "SIGTERM" if isinstance(err, Stopped) else "SIGINT"
        # on a line of its own: a progress bar may be mid-line (tqdm ends its lines with "\r", not "\n")
        print(f"\nrlrec: stopped by {name}; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 143 if isinstance(err, Stopped) else 130
    except OSError as err:
        if err.filename is None:  # not about a path the user gave: a bug or the system's, keep the traceback
            raise
        print(f"rlrec: error: {err.filename}: {err.strerror}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
