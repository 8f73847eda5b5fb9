"""`rlrec data prepare`: interaction logs -> `runs/<name>/data/` for every later stage.

Writes:
    dataset/          DatasetDict (train / valid / test) of prompt, completion, target, history, user
    catalog.jsonl     one item a line: item_id, title, identifier, attributes
    sequences.jsonl   one user a line: the filtered chronological items (and timestamps), for baselines
    index.json        the semantic-ID index, when the source or config has one
    stats.json        counts (users, items, interactions, split sizes) and every skipped row by reason
    config.yaml       the resolved recipe;  manifest.json  inputs with hashes, versions, seed, wall time
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import datasets

from rlrec.config import dump_config
from rlrec.data import RawData, read_source
from rlrec.data.config import DataConfig
from rlrec.data.lcrec import read_index
from rlrec.data.splits import leave_one_out, temporal, truncate
from rlrec.data.types import Sample
from rlrec.errors import ConfigError, RlrecError
from rlrec.items.identifiers import build_identifiers
from rlrec.manifest import write_manifest
from rlrec.prompts import build_dataset
from rlrec.recipe import Recipe


def items_index(recipe: Recipe) -> Path | None:
    """With an `items` section and `prompt.identifier: sid`, items are rendered by the items stage's index."""
    if recipe.items is None or recipe.section("data").prompt.identifier != "sid":
        return None
    path = recipe.stage_dir("items") / "index.json"
    if not path.is_file():
        raise RlrecError(f"{path} not found: run `rlrec items build` with this recipe first")
    return path


def make_splits(raw: RawData, config: DataConfig, skipped: Counter) -> dict[str, list[Sample]]:
    split = config.split
    if split.method == "given":
        if raw.given_splits is None:
            raise ConfigError(f"split.method 'given' needs a pre-split source; '{config.source.format}' is not")
        return given_splits(truncate(raw.given_splits, split.max_history), split.train_from, split.holdout)
    if raw.interactions is None:
        raise ConfigError(f"source '{config.source.format}' is pre-split: use split.method 'given'")
    if split.method == "leave_one_out":
        return leave_one_out(raw.interactions, split.max_history, skipped)
    return temporal(raw.interactions, split.ratios, split.max_history)


def given_splits(splits: dict[str, list[Sample]], train_from: str, holdout: float) -> dict[str, list[Sample]]:
    """The export's splits as they are, or (train_from: valid) its valid rows cut into train and a held-out tail."""
    if train_from == "train":
        return splits  # an export without train rows still serves evaluation (and most-popular on valid rows)
    if "train" in splits:
        raise ConfigError("split.train_from: valid, but the export has a train split: use it (train_from: train)")
    if "valid" not in splits or "test" not in splits:
        raise ConfigError(f"split.train_from: valid needs given valid and test splits, the export has {sorted(splits)}")
    rows = splits["valid"]
    cut = len(rows) - max(1, int(round(len(rows) * holdout)))
    return {"train": rows[:cut], "valid": rows[cut:], "test": splits["test"]}


def compute_stats(raw: RawData, splits: dict[str, list[Sample]], config: DataConfig, notes: Counter) -> dict:
    if raw.interactions is not None:
        users = raw.interactions.num_users
        interactions = raw.interactions.num_interactions
        interacted = len(raw.interactions.item_ids())
    else:  # pre-split export: the full logs are not available, only its samples
        users = len({s.user for samples in splits.values() for s in samples})
        interactions = None
        interacted = len({i for samples in splits.values() for s in samples for i in (*s.history, s.target)})
    lengths = [len(s.history) for samples in splits.values() for s in samples]
    return {
        "protocol": config.split.method,
        "max_history": config.split.max_history,
        "num_users": users,
        "num_items": len(raw.catalog),
        "num_items_interacted": interacted,
        "num_interactions": interactions,
        "splits": {name: len(samples) for name, samples in splits.items()},
        "mean_history_length": round(sum(lengths) / max(len(lengths), 1), 3),
        "identifier": config.prompt.identifier,
        "identifier_notes": dict(sorted(notes.items())),
        "skipped": dict(sorted(raw.skipped.items())),
        "skipped_examples": dict(sorted(raw.examples.items())),
    }


def write_jsonl(path: Path, rows) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def prepare(recipe: Recipe) -> dict:
    """Run the data stage of `recipe`; return its stats."""
    config: DataConfig = recipe.section("data")
    started = time.time()
    raw = read_source(config.source)
    index_path = items_index(recipe)
    if index_path is not None:
        raw.sid_index = read_index(index_path)
    splits = make_splits(raw, config, raw.skipped)
    notes: Counter = Counter()
    identifiers = build_identifiers(config.prompt.identifier, raw.catalog, raw.sid_index, notes)
    dataset = build_dataset(splits, identifiers, config.prompt)

    out = recipe.stage_dir("data")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    datasets.disable_progress_bars()  # a save takes well under a second; the bars would only be noise
    dataset.save_to_disk(str(out / "dataset"))
    datasets.enable_progress_bars()
    write_jsonl(
        out / "catalog.jsonl",
        (
            {"item_id": i, "title": item.title, "identifier": identifiers[i], "attributes": item.attributes}
            for i, item in raw.catalog.items.items()
        ),
    )
    if raw.interactions is not None:
        stamps = raw.interactions.timestamps
        write_jsonl(
            out / "sequences.jsonl",
            (
                {"user": u, "items": items, "timestamps": stamps[u] if stamps else None}
                for u, items in raw.interactions.sequences.items()
            ),
        )
    if raw.sid_index is not None:
        (out / "index.json").write_text(json.dumps(raw.sid_index) + "\n", encoding="utf-8")
    stats = compute_stats(raw, splits, config, notes)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    dump_config(recipe, out / "config.yaml")
    inputs = [p for p in (config.source.path, config.source.items_path, config.source.index_path, index_path) if p]
    write_manifest(out, inputs, recipe.seed, time.time() - started, stage="data")
    return stats
