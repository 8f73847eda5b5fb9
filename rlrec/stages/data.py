"""`rlrec data prepare`: interaction logs -> `runs/<name>/data/` for every later stage.

Reads the source (`rlrec.data` readers and filters), renders items by their identifiers (`rlrec.items`; with an
`items` section and `prompt.identifier: sid`, by the items stage's index), splits the samples (`rlrec.data.splits`),
turns them into recommendation-as-text rows (`rlrec.prompts`) and writes the prepared folder
(`rlrec.data.prepared`, whose docstring lists its files), plus the resolved config.yaml and manifest.json.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from rlrec.data import read_source
from rlrec.data.prepared import compute_stats, write_prepared
from rlrec.data.splits import make_splits
from rlrec.errors import RlrecError
from rlrec.items.identifiers import IDENTIFIERS, build_identifiers
from rlrec.items.index import read_index
from rlrec.prompts import build_dataset
from rlrec.recipe import Recipe
from rlrec.schema import DataConfig
from rlrec.stages.runner import Timer, write_outputs


def items_index(recipe: Recipe) -> Path | None:
    """With an `items` section and `prompt.identifier: sid`, items are rendered by the items stage's index."""
    if recipe.items is None or not IDENTIFIERS[recipe.section("data").prompt.identifier].needs_index:
        return None
    path = recipe.stage_dir("items") / "index.json"
    if not path.is_file():
        raise RlrecError(f"{path} not found: run `rlrec items build` with this recipe first")
    return path


def run(recipe: Recipe) -> dict:
    """Run the data stage of `recipe`; return its stats."""
    config: DataConfig = recipe.section("data")
    timer = Timer()
    raw = read_source(config.source)
    index_path = items_index(recipe)
    if index_path is not None:
        raw.sid_index, raw.sid_index_source = read_index(index_path), str(index_path)
    splits = make_splits(raw, config, raw.skipped)
    notes: Counter = Counter()
    identifiers = build_identifiers(config.prompt.identifier, raw.catalog, raw.sid_index, notes,
                                    raw.sid_index_source or "index.json", config.prompt.max_title_chars)  # fmt: skip
    stats = compute_stats(raw, splits, config, notes)
    if raw.sid_index is not None:  # say which index was found, and whether the identifiers use it
        stats["sid_index"] = {"source": raw.sid_index_source, "used": IDENTIFIERS[config.prompt.identifier].needs_index}
    check_not_empty(config, stats)
    dataset = build_dataset(splits, identifiers, config.prompt)
    inputs = [p for p in (config.source.path, config.source.items_path, config.source.index_path, index_path) if p]
    write_prepared(recipe.stage_dir("data"), dataset, raw.catalog, identifiers, raw.interactions, raw.sid_index,
                   stats, inputs)  # fmt: skip
    write_outputs(recipe, "data", inputs, timer)
    return stats


def check_not_empty(config: DataConfig, stats: dict) -> None:
    """Every later stage needs train, valid and test samples: an empty split is an error here, with what was read,
    not an IndexError in the stage after."""
    # A given split has the export's splits only (MiniOneRec's public one has no train split: evaluation only,
    # unless split.train_from: valid); the others always have all three.
    required = ["test", *stats["splits"]] if config.split.method == "given" else ["train", "valid", "test"]
    empty = [name for name in ("train", "valid", "test") if name in required and not stats["splits"].get(name)]
    if not empty:
        return
    interactions = "?" if stats["num_interactions"] is None else f"{stats['num_interactions']:,}"
    need = {"leave_one_out": "users with 3 interactions or more (valid and test samples), some with 4 or more (train)",
            "temporal": "enough interactions in each time window (split.ratios)",
            "given": "rows in each of the export's split files"}[config.split.method]  # fmt: skip
    skipped = f", skipped {json.dumps(stats['skipped'])}" if stats["skipped"] else ""
    raise RlrecError(f"{config.source.path}: no {' / '.join(empty)} samples ({stats['num_users']:,} users, "
                     f"{stats['num_items']:,} items, {interactions} interactions after filtering{skipped}); "
                     f"{config.split.method} needs {need}")  # fmt: skip


def report(recipe: Recipe, stats: dict) -> list[str]:
    """What `rlrec data prepare` prints."""
    splits = ", ".join(f"{name} {n:,}" for name, n in stats["splits"].items())
    interactions = "n/a (pre-split export)" if stats["num_interactions"] is None else f"{stats['num_interactions']:,}"
    lines = [f"wrote {recipe.stage_dir('data')}",
             f"  users {stats['num_users']:,}  items {stats['num_items']:,}  interactions {interactions}",
             f"  {stats['protocol']} samples: {splits}"]  # fmt: skip
    if "sid_index" in stats:
        used = stats["sid_index"]["used"]
        lines.append(
            f"  semantic-ID index {stats['sid_index']['source']}: "
            + ("the items' identifiers" if used else "found, not used (prompt.identifier is not sid)")
        )
    if stats["skipped"]:
        lines.append(f"  skipped: {json.dumps(stats['skipped'])} (examples in stats.json)")
    if stats["identifier_notes"]:
        notes = json.dumps(stats["identifier_notes"])
        lines.append(f"  identifiers: {notes} (data.prompt.max_title_chars cuts titles)")
    return lines
