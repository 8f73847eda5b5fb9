"""Generic reader: an interactions table (user, item[, timestamp][, rating]) in CSV, TSV, Parquet or JSON Lines,
with an optional items table (item id, title, any other columns as attributes).

Column names come from `source.columns`. Timestamps may be integers (epoch seconds or any monotone counter),
floats, or ISO-8601 strings. Without an items table every item gets the fallback title `item <id>`, counted as
`missing_title` in stats.json. Rows are reported by line (CSV/TSV/JSONL) or by row number (Parquet).
"""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from rlrec.data.filters import Event, events_to_interactions
from rlrec.data.io import require_file
from rlrec.data.types import BadRows, Catalog, Item, RawData
from rlrec.errors import DataError
from rlrec.schema import ColumnsConfig, SourceConfig

SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".jsonl")


def iter_rows(path: Path, delimiter: str | None, encoding: str) -> Iterator[tuple[str, dict, str | None]]:
    """Yield `(location, row, problem)`: location reads `file:line` or `file row N`; problem is None or says why
    the row is malformed (the caller counts or raises it, so a bad row never ends the read early)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for a bad file
            raise DataError(f"{path}: cannot read as Parquet: {err}") from None
        for number, row in enumerate(table.to_pylist(), start=1):
            yield f"{path} row {number}", row, None
    elif suffix == ".jsonl":
        with path.open(encoding=encoding) as handle:
            for number, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as err:
                    yield f"{path}:{number}", {}, f"invalid JSON: {err.msg}"
                    continue
                problem = None if isinstance(row, dict) else "expected a JSON object per line"
                yield f"{path}:{number}", row if problem is None else {}, problem
    elif suffix in (".csv", ".tsv", ".txt"):
        csv.field_size_limit(sys.maxsize)
        sep = delimiter or ("\t" if suffix == ".tsv" else ",")
        try:
            with path.open(encoding=encoding, newline="") as handle:
                reader = csv.DictReader(handle, delimiter=sep)
                expected = len(reader.fieldnames or [])
                for row in reader:
                    # DictReader puts extra fields under the key None and fills missing ones with None.
                    got = sum(1 for k, v in row.items() if k is not None and v is not None) + len(row.get(None) or [])
                    problem = None if got == expected else f"expected {expected} fields as in the header, got {got}"
                    yield f"{path}:{reader.line_num}", row, problem
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not valid {encoding} (byte offset {err.start}); set source.encoding") from None
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(SUFFIXES)}")


def parse_timestamp(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("boolean timestamp")
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, datetime):
        return int(value.timestamp())
    text = str(value).strip()
    try:
        return int(float(text))
    except ValueError:
        return int(datetime.fromisoformat(text).timestamp())


def _check_columns(path: Path, first: dict, wanted: list[str]) -> None:
    missing = [c for c in wanted if c not in first]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; have {', '.join(map(str, first))}; set source.columns"
        )


def read_items_table(path: Path, columns: ColumnsConfig, config: SourceConfig, bad: BadRows) -> Catalog:
    key = columns.item_key or columns.item
    items: dict[str, Item] = {}
    checked = False
    for where, row, problem in iter_rows(path, config.delimiter, config.encoding or "utf-8-sig"):
        if problem is not None:
            bad("bad_item_row", f"{where}: {problem}")
            continue
        if not checked:
            _check_columns(path, row, [key, columns.title])
            checked = True
        item_id = str(row[key]).strip() if row[key] is not None else ""
        if not item_id:
            bad("bad_item_row", f"{where}: empty item id")
            continue
        if item_id in items:
            bad("duplicate_item", f"{where}: item {item_id} appears twice")
            continue
        title = "" if row[columns.title] is None else str(row[columns.title])
        attributes = {str(k): str(v) for k, v in row.items() if k not in (key, columns.title) and v is not None}
        items[item_id] = Item(item_id, title, attributes)
    return Catalog(items)


def read_generic(config: SourceConfig) -> RawData:
    columns = config.columns or ColumnsConfig()
    if config.min_rating is not None and columns.rating is None:
        raise DataError("source.min_rating needs a rating column: set source.columns.rating")
    path = require_file(config.path, "an interactions table (csv, tsv, parquet or jsonl)")
    bad = BadRows(config.on_error)
    skipped: Counter = Counter()
    catalog = None
    if config.items_path:
        catalog = read_items_table(require_file(config.items_path, "an items table"), columns, config, bad)
    wanted = [columns.user, columns.item] + [c for c in (columns.timestamp, columns.rating) if c]
    events: list[Event] = []
    seen_items: dict[str, None] = {}
    checked = False
    for where, row, problem in iter_rows(path, config.delimiter, config.encoding or "utf-8-sig"):
        if problem is not None:
            bad("bad_field_count", f"{where}: {problem}")
            continue
        if not checked:
            _check_columns(path, row, wanted)
            checked = True
        user, item = str(row[columns.user] or "").strip(), str(row[columns.item] or "").strip()
        if not user or not item:
            bad("bad_value", f"{where}: empty {columns.user} or {columns.item}")
            continue
        try:
            timestamp = parse_timestamp(row[columns.timestamp]) if columns.timestamp else None
            rating = float(row[columns.rating]) if columns.rating else None
        except (TypeError, ValueError):
            bad("bad_value", f"{where}: expected a numeric or ISO-8601 {columns.timestamp} and a numeric rating")
            continue
        if catalog is not None and item not in catalog:
            bad("unknown_item", f"{where}: item {item} is not in {config.items_path}")
            continue
        if config.min_rating is not None and rating is not None and rating < config.min_rating:
            skipped["below_min_rating"] += 1
            continue
        seen_items.setdefault(item)
        events.append(Event(user, item, timestamp))
    if catalog is None:
        catalog = Catalog({i: Item(i, "", {}) for i in seen_items})
    interactions = events_to_interactions(events, config.drop_repeat_items, skipped)
    return bad.attach(RawData(catalog=catalog, interactions=interactions, skipped=skipped))
