"""What rlrec may write: folders it made, one process per run folder, and stages that die with their pipeline.

Three rules, each with the failure it prevents:
- `claim_output(out, purpose, inputs)`: a command that writes a whole folder (`rlrec publish --out`) writes only
  into a new or empty folder, or one rlrec made for the same purpose (a `.rlrec-output` marker naming it); never
  into the current folder, an ancestor of it, or a folder holding the command's inputs. The content is written into
  a temporary sibling and renamed into place when complete (`replace_output`), so a failed export leaves the old
  folder as it was and never half a new one.
- `hold_run(run_dir, command)`: a lock file `runs/<name>/.lock` with the PID, host and command of the process that
  owns the run. A second process on the same run is refused with the owner named; a lock whose process is gone
  (same host, PID not running) is taken over with a line saying so. The owner's children (the stage processes a
  pipeline launches, every rank of `accelerate launch`) inherit the lock through `RLREC_RUN_LOCK`.
- `watch_parent()`: a stage launched by `rlrec pipeline` stops (SIGTERM to itself) when the pipeline is gone,
  `kill -9` included, instead of training on, re-parented, into a folder the pipeline's rerun would resume.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from rlrec.errors import RlrecError

MARKER = ".rlrec-output"
LOCK_FILE = ".lock"
PIPELINE_KEY = ".pipeline_key"  # written by `rlrec pipeline` into a stage folder when the stage starts
BOOKKEEPING = {LOCK_FILE, PIPELINE_KEY}  # rlrec's own files: a folder holding only these counts as empty
LOCK_ENV = "RLREC_RUN_LOCK"
PARENT_ENV = "RLREC_PARENT_PID"


# --- output folders ---------------------------------------------------------------------------------------------------


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def claim_output(out: str | Path, purpose: str, inputs: Iterable[str | Path] = (),
                 made_by_rlrec: Callable[[Path], bool] | None = None) -> Path:  # fmt: skip
    """Check that `out` may receive a folder written for `purpose`; return it resolved. Refused (nothing written):
    the current folder or one above it, a folder holding or inside an input, a file, a non-empty folder without
    rlrec's marker for the same purpose (`made_by_rlrec` recognises folders rlrec wrote before it had markers)."""
    target = Path(out).resolve()
    if _inside(Path.cwd().resolve(), target):
        raise RlrecError(f"{out}: is the current folder or holds it; choose a new folder for the {purpose}")
    for source in inputs:
        source = Path(source).resolve()
        if _inside(source, target) or _inside(target, source):
            raise RlrecError(f"{out}: overlaps the input {source}; choose a folder outside it for the {purpose}")
    if target.exists() and not target.is_dir():
        raise RlrecError(f"{out}: is a file, not a folder; choose a new folder for the {purpose}")
    if target.is_dir() and any(p.name not in BOOKKEEPING for p in target.iterdir()):
        marker = target / MARKER
        owner = marker.read_text(encoding="utf-8", errors="replace").strip() if marker.is_file() else None
        if owner != purpose and not (owner is None and made_by_rlrec is not None and made_by_rlrec(target)):
            made = f"was written by rlrec for {owner!r}" if owner else "was not written by rlrec"
            raise RlrecError(f"{out}: not empty and {made}; rlrec replaces only its own {purpose} folders; choose an "
                             "empty or new folder")  # fmt: skip
    return target


def staging_folder(target: Path) -> Path:
    """A new, empty temporary sibling of `target` to write into (same file system: the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if staging.exists():  # our own PID's leftover from a crash: only this process can have made it
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def replace_output(staging: Path, target: Path, purpose: str) -> Path:
    """Mark `staging` as rlrec's `purpose` folder and move it to `target`; the earlier folder (checked by
    `claim_output` to be ours) is moved aside first and removed only once the new one is in place."""
    (staging / MARKER).write_text(purpose + "\n", encoding="utf-8")
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old)
    return target


# --- one process per run folder ---------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # running, under another user
        return True
    return True


def _read_lock(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)


@contextlib.contextmanager
def hold_run(run_dir: Path, command: str) -> Iterator[None]:
    """Own `run_dir` for the duration of the block (see the module docstring). Ranks other than 0 of a launch, and
    children of the owner, run under the owner's lock."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = (run_dir / LOCK_FILE).resolve()
    if os.environ.get(LOCK_ENV) == str(path) or _rank() != 0:
        with _naming_a_full_disk(run_dir):
            yield
        return
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read_lock(path)
            if owner is None and time.time() - path.stat().st_mtime < 10:  # being written by its owner right now
                raise RlrecError(f"{run_dir}: another rlrec process is starting on this run ({path})") from None
            if owner is not None and (owner.get("host") != me["host"] or _alive(owner["pid"])):
                raise RlrecError(f"{run_dir}: in use by PID {owner['pid']} on {owner.get('host')} "
                                 f"(`{owner.get('command')}`, since {owner.get('started')}); wait for it or stop "
                                 f"it, or use another run name") from None  # fmt: skip
            what = f"PID {owner['pid']} (`{owner.get('command')}`)" if owner else "an unreadable lock"
            print(f"rlrec: {run_dir}: taking over the lock of {what}, which is no longer running", file=sys.stderr)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(me, handle)
        break
    else:
        raise RlrecError(f"{run_dir}: could not take the run lock {path}; another process took it first")
    os.environ[LOCK_ENV] = str(path)
    try:
        with _naming_a_full_disk(run_dir):
            yield
    finally:
        os.environ.pop(LOCK_ENV, None)
        if (_read_lock(path) or {}).get("pid") == os.getpid():
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def _naming_a_full_disk(run_dir: Path) -> Iterator[None]:
    """A full disk raised from a write to an open file names no path; the run this process writes is where it was
    (`run_reporting_errors` then prints one line with it instead of a traceback)."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno in (errno.ENOSPC, errno.EDQUOT):
            err.filename = str(run_dir)
        raise


# --- stages die with their pipeline -----------------------------------------------------------------------------------


def child_environment() -> dict[str, str]:
    """The environment of a stage process a pipeline launches: it knows its pipeline's PID (`watch_parent`)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())}


def watch_parent(interval: float = 1.0) -> None:
    """In a stage launched by a pipeline: a daemon thread that sends SIGTERM to this process once the pipeline is
    gone (the stage then stops as on any SIGTERM). Polling works for every rank under `accelerate launch` (a
    parent-death signal would reach only the launcher, the pipeline's direct child)."""
    pid = os.environ.get(PARENT_ENV)
    if not pid or not pid.isdigit():
        return
    parent = int(pid)

    def watch() -> None:
        while _alive(parent):
            time.sleep(interval)
        print(f"rlrec: the pipeline (PID {parent}) is gone; stopping this stage", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="rlrec-watch-parent", daemon=True).start()
