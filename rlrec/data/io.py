"""File helpers shared by the readers: line iteration with line numbers and declared encodings, strict JSON.

Each helper turns a low-level failure (missing file, undecodable byte, JSON syntax, duplicated JSON key) into a
`DataError` that names the file and line, because a user needs to know where to look, not a Python traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rlrec.errors import DataError

# Files bigger than this get a progress bar while they are read.
PROGRESS_MIN_BYTES = 8 * 1024 * 1024


def require_file(path: str | Path, what: str) -> Path:
    """Return `path` if it is a file, else fail saying what the file was expected to be."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing file: {path} (expected {what})")
    return path


def require_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"missing folder: {path} (expected {what})")
    return path


def iter_lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """Yield `(line_number, text)` from 1, without the line ending; a byte the encoding cannot decode fails with
    the line number instead of a UnicodeDecodeError somewhere inside a reader."""
    size = os.path.getsize(path)
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"read {path.name}", disable=size < PROGRESS_MIN_BYTES)
    with path.open("rb") as handle, bar:
        for number, raw in enumerate(handle, start=1):
            bar.update(len(raw))
            try:
                text = raw.decode(encoding)
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}:{number}: byte {raw[err.start]:#04x} at column {err.start + 1} is not valid {encoding}; "
                    "set source.encoding to the file's encoding (MovieLens item files are latin-1)"
                ) from None
            yield number, text.rstrip("\r\n")


def _no_duplicate_keys(path: Path):
    def hook(pairs: list[tuple[str, Any]]) -> dict:
        out: dict = {}
        for key, value in pairs:
            if key in out:
                raise DataError(f"{path}: key {key!r} appears twice (a repeat would silently replace the first)")
            out[key] = value
        return out

    return hook


def load_json(path: Path) -> Any:
    """Load a JSON file strictly: syntax errors name line and column, duplicated keys fail."""
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle, object_pairs_hook=_no_duplicate_keys(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON at column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 (byte offset {err.start})") from None


def find_one(folder: Path, pattern: str, what: str) -> Path:
    """The single file in `folder` matching `pattern`; zero or several is an error naming the candidates."""
    matches = sorted(folder.glob(pattern))
    if len(matches) != 1:
        found = ", ".join(m.name for m in matches) or "none"
        raise DataError(f"{folder}: expected exactly one {what} ({pattern}), found {found}; set source.name")
    return matches[0]
