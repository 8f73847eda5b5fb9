"""LC-Rec / LETTER format reader: `<name>.inter.json`, `<name>.item.json`, optional `<name>.index.json`.

- `inter.json`: `{"<user>": [item, ...]}` with each user's items already in chronological order (no timestamps).
- `item.json`: `{"<item>": {"title": ..., "description": ..., "brand": ..., "categories": ...}}`; the title is the
  item's name, every other string field becomes an attribute.
- `index.json`: `{"<item>": ["<a_1>", "<b_2>", ...]}`, the semantic-ID index, read as it is (`rlrec.items`
  validates it where the identifiers are built).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rlrec.data.io import find_one, load_json, require_dir, require_file
from rlrec.data.types import BadRows, Catalog, Interactions, Item, RawData
from rlrec.errors import DataError
from rlrec.schema import SourceConfig


def read_items(path: Path, bad: BadRows) -> Catalog:
    raw = load_json(path)
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected an object {{item_id: {{title, ...}}}}, got {type(raw).__name__}")
    items: dict[str, Item] = {}
    for item_id, fields in raw.items():
        if not isinstance(fields, dict) or not isinstance(fields.get("title", ""), str):
            bad("bad_item_row", f"{path} [item {item_id}]: expected an object with a string 'title'")
            continue
        attributes = {
            key: value if isinstance(value, str) else ", ".join(map(str, value))
            for key, value in fields.items()
            if key != "title" and isinstance(value, (str, list))
        }
        items[str(item_id)] = Item(str(item_id), fields.get("title", ""), attributes)
    return Catalog(items)


def read_sequences(path: Path, catalog: Catalog, bad: BadRows, skipped: Counter) -> Interactions:
    raw = load_json(path)
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected an object {{user_id: [item_id, ...]}}, got {type(raw).__name__}")
    sequences: dict[str, list[str]] = {}
    for user, items in raw.items():
        if not isinstance(items, list) or not all(isinstance(i, (int, str)) for i in items):
            bad("bad_sequence", f"{path} [user {user}]: expected a list of item ids")
            continue
        if not items:
            bad("empty_sequence", f"{path} [user {user}]: empty item list")
            continue
        ids = [str(i) for i in items]
        unknown = [i for i in ids if i not in catalog]
        if unknown:
            bad("unknown_item", f"{path} [user {user}]: item {unknown[0]} is not in the item file")
            continue
        sequences[str(user)] = ids
    return Interactions(sequences)


def read_lcrec(config: SourceConfig) -> RawData:
    folder = require_dir(config.path, "an LC-Rec folder with <name>.inter.json and <name>.item.json")
    if config.name is None:
        name = find_one(folder, "*.inter.json", "interaction file").name.removesuffix(".inter.json")
    else:
        name = config.name
    bad = BadRows(config.on_error)
    skipped: Counter = Counter()
    catalog = read_items(require_file(folder / f"{name}.item.json", "the LC-Rec item file"), bad)
    interactions = read_sequences(
        require_file(folder / f"{name}.inter.json", "the LC-Rec interaction file"), catalog, bad, skipped
    )
    index_path = Path(config.index_path) if config.index_path else folder / f"{name}.index.json"
    raw = RawData(catalog=catalog, interactions=interactions, skipped=skipped)
    if config.index_path or index_path.is_file():  # validated where identifiers are built (rlrec.items)
        raw.sid_index = load_json(require_file(index_path, "a semantic-ID index"))
        raw.sid_index_source = str(index_path)
    return bad.attach(raw)
