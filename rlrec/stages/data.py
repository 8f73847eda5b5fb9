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
from rlrec.items.identifiers import build_identifiers
from rlrec.items.index import read_index
from rlrec.prompts import build_dataset
from rlrec.recipe import Recipe
from rlrec.schema import DataConfig
from rlrec.stages.runner import Timer, write_outputs


def items_index(recipe: Recipe) -> Path | None:
    """With an `items` section and `prompt.identifier: sid`, items are rendered by the items stage's index."""
    if recipe.items is None or recipe.section("data").prompt.identifier != "sid":
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
                                    raw.sid_index_source or "index.json")  # fmt: skip
    dataset = build_dataset(splits, identifiers, config.prompt)
    stats = compute_stats(raw, splits, config, notes)
    write_prepared(recipe.stage_dir("data"), dataset, raw.catalog, identifiers, raw.interactions, raw.sid_index, stats)
    inputs = [p for p in (config.source.path, config.source.items_path, config.source.index_path, index_path) if p]
    write_outputs(recipe, "data", inputs, timer)
    return stats


def report(recipe: Recipe, stats: dict) -> list[str]:
    """What `rlrec data prepare` prints."""
    splits = ", ".join(f"{name} {n:,}" for name, n in stats["splits"].items())
    interactions = "n/a (pre-split export)" if stats["num_interactions"] is None else f"{stats['num_interactions']:,}"
    lines = [f"wrote {recipe.stage_dir('data')}",
             f"  users {stats['num_users']:,}  items {stats['num_items']:,}  interactions {interactions}",
             f"  {stats['protocol']} samples: {splits}"]  # fmt: skip
    if stats["skipped"]:
        lines.append(f"  skipped: {json.dumps(stats['skipped'])} (examples in stats.json)")
    return lines
