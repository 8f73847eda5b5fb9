"""MiniOneRec export reader: `{train,valid,test}/<name>.csv`, `info/<name>.txt`, `index/<stem>.{index,item}.json`.

The CSVs are already split samples (a global chronological 8:1:1 split over sliding windows, history <= 10), so this
reader fills `RawData.given_splits` and the data is used with `split.method: given`. List columns are Python-list
literals (`"[3437, 642]"`); they are parsed with `ast.literal_eval`, which accepts literals only, never `eval`.
A missing `train/` folder (the public snapshot lacks it) yields only the splits that exist.
"""

from __future__ import annotations

import ast
import csv
import sys
from pathlib import Path

from rlrec.data.io import find_one, iter_lines, load_json, require_dir
from rlrec.data.types import BadRows, Catalog, Item, RawData, Sample
from rlrec.errors import DataError
from rlrec.schema import SourceConfig

REQUIRED_COLUMNS = ("user_id", "history_item_id", "item_id")
SPLITS = ("train", "valid", "test")


def parse_list_literal(text: str) -> list:
    """`"[1, 2]"` -> `[1, 2]`; anything that is not a literal list raises ValueError."""
    value = ast.literal_eval(text)
    if not isinstance(value, list):
        raise ValueError(f"not a list: {text[:60]!r}")
    return value


def read_info(path: Path, bad: BadRows) -> tuple[Catalog, dict[str, list[str]]]:
    """`SID<TAB>title<TAB>item_id` lines -> catalogue and semantic-ID index (`<a_1><b_2>` split into codes)."""
    items: dict[str, Item] = {}
    index: dict[str, list[str]] = {}
    for line, text in iter_lines(path):
        fields = text.split("\t")
        if len(fields) != 3:
            bad("bad_item_row", f"{path}:{line}: expected 3 tab-separated fields (sid, title, item_id)")
            continue
        sid, title, item_id = fields
        items[item_id] = Item(item_id, title, {})
        index[item_id] = [code + ">" for code in sid.split(">") if code]
    return Catalog(items), index


def read_samples(path: Path, catalog: Catalog, bad: BadRows) -> list[Sample]:
    csv.field_size_limit(sys.maxsize)
    try:
        return _read_samples(path, catalog, bad)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 (byte offset {err.start}); MiniOneRec exports are UTF-8") from None


def _read_samples(path: Path, catalog: Catalog, bad: BadRows) -> list[Sample]:
    samples = []
    with path.open(encoding="utf-8-sig", newline="") as handle:  # utf-8-sig: utf-8 that drops a BOM
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            raise DataError(f"{path}: empty file; expected a CSV with the header {', '.join(REQUIRED_COLUMNS)}")
        missing = [c for c in REQUIRED_COLUMNS if c not in reader.fieldnames]
        if missing:
            raise DataError(f"{path}:1: missing column(s) {', '.join(missing)}; have {reader.fieldnames}")
        for row in reader:
            line = reader.line_num
            try:
                history = [str(i) for i in parse_list_literal(row["history_item_id"])]
                target = str(int(row["item_id"]))
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                bad("bad_value", f"{path}:{line}: expected history_item_id as a list literal and an integer item_id")
                continue
            if not history:
                bad("empty_history", f"{path}:{line}: empty history")
                continue
            unknown = [i for i in [*history, target] if i not in catalog]
            if unknown:
                bad("unknown_item", f"{path}:{line}: item {unknown[0]} is not in the info file")
                continue
            samples.append(Sample(row["user_id"], tuple(history), target))
    return samples


def _add_attributes(catalog: Catalog, folder: Path, bad: BadRows) -> None:
    """Fill descriptions, brands and categories from `index/*.item.json` when it is there."""
    matches = sorted(folder.glob("*.item.json"))
    if len(matches) != 1:
        return
    for item_id, fields in load_json(matches[0]).items():
        if item_id not in catalog or not isinstance(fields, dict):
            bad("unknown_item", f"{matches[0]} [item {item_id}]: not in the info file")
            continue
        catalog[item_id].attributes = {
            k: str(v) for k, v in fields.items() if k != "title" and isinstance(v, (str, int, float))
        }


def read_minionerec(config: SourceConfig) -> RawData:
    root = require_dir(config.path, "a MiniOneRec export with info/ and valid/ or test/ folders")
    bad = BadRows(config.on_error)
    info = find_one(require_dir(root / "info", "the info/ folder"), f"{config.name or '*'}.txt", "info file")
    name = info.stem
    catalog, sid_index = read_info(info, bad)
    if (root / "index").is_dir():
        _add_attributes(catalog, root / "index", bad)
    source = str(info)
    if config.index_path:  # validated where the identifiers are built (rlrec.items)
        sid_index, source = load_json(Path(config.index_path)), config.index_path
    splits = {}
    for split in SPLITS:
        path = root / split / f"{name}.csv"
        if path.is_file():
            splits[split] = read_samples(path, catalog, bad)
    if not splits:
        raise DataError(f"{root}: no split CSVs found (expected {{train,valid,test}}/{name}.csv)")
    return bad.attach(RawData(catalog=catalog, given_splits=splits, sid_index=sid_index, sid_index_source=source))
