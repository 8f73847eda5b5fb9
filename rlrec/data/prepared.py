"""The prepared data folder, `runs/<name>/data/`: written by the data stage, read by every later stage (SFT adds its
tokenised-row cache under `data/tokenised/`, keyed by what the rows depend on: rlrec.training.sft_cache).

    dataset/          DatasetDict (train / valid / test) of prompt, completion, target, history, user
    catalog.jsonl     one item a line: item_id, title, identifier, attributes (catalogue order)
    sequences.jsonl   one user a line: the filtered chronological items (and timestamps), for baselines
    index.json        the semantic-ID index, when the source or the items stage has one
    stats.json        counts (users, items, interactions, split sizes) and every skipped row by reason

`write_prepared` and `load_run_data` are the two ends of that contract; `RunData` is what a stage holds in memory.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict, load_from_disk

from rlrec.config import from_dict, to_dict
from rlrec.data.types import Catalog, Interactions, RawData, Sample
from rlrec.errors import DataError, RlrecError
from rlrec.ownership import MARKER, claim_output
from rlrec.schema import DataConfig, PromptConfig


@dataclass
class RunData:
    """What every evaluator and trainer reads from `runs/<name>/data/`."""

    path: Path
    dataset: DatasetDict
    item_ids: list[str]  # the catalogue, in order
    identifiers: dict[str, str]
    popularity: Counter  # train interaction counts
    stats: dict
    catalog_rows: list[dict] = field(default_factory=list)  # catalog.jsonl rows (item_id, title, identifier, ...)

    @property
    def titles(self) -> dict[str, str]:
        """item id -> title ("" for items without one)."""
        return {row["item_id"]: row.get("title", "") for row in self.catalog_rows}

    def rows(self, split: str, max_users: int | None = None) -> Dataset:
        """The rows of a split, or its first `max_users` (quick checks; for selection use `sample`)."""
        if split not in self.dataset:
            raise RlrecError(f"{self.path}: the data has no '{split}' split (has {', '.join(self.dataset)})")
        rows = self.dataset[split]
        return rows.select(range(min(max_users, len(rows)))) if max_users else rows

    def sample(self, split: str, size: int | None, seed: int) -> Dataset:
        """A seeded uniform sample of `size` rows of a split, in file order (all rows when `size` is None or not
        smaller): what selection decisions rest on, so it must stand for the whole split."""
        rows = self.rows(split)
        if size is None or size >= len(rows):
            return rows
        return rows.select(sorted(random.Random(seed).sample(range(len(rows)), size)))

    @cached_property
    def prompt(self) -> PromptConfig:
        """How this data renders a history for a model: the data section's whole `prompt`, as the data stage wrote
        it (folders written before it held every field get the defaults of the missing ones)."""
        return from_dict(PromptConfig, {"identifier": self.stats["identifier"], **self.stats.get("prompt", {})})

    @property
    def protocol(self) -> dict:
        return {"split_method": self.stats["protocol"], "max_history": self.stats["max_history"],
                "candidates": "full catalogue", "num_items": len(self.item_ids)}  # fmt: skip


def train_popularity(train: Dataset) -> Counter:
    """Interaction counts of the training split: every train target, plus each user's first item (the history of
    a one-item prefix). Under leave-one-out this is exactly the count over every user's items[:-2]."""
    counts: Counter = Counter(train["target"])
    counts.update(history[0] for history in train["history"] if len(history) == 1)
    return counts


def training_sequences(data: RunData, split: str = "train", with_users: bool = False) -> list:
    """Each user's training items in order, rebuilt from the split's rows: the first row's history followed by every
    row's target. Under leave-one-out this is exactly items[:-2] (never a valid or test position); under the
    temporal split it is the user's items up to the train cut. `with_users`: (user, items) pairs."""
    sequences: dict[str, list[str]] = {}
    rows = data.rows(split)
    for user, history, target in zip(rows["user"], rows["history"], rows["target"], strict=True):
        if user not in sequences:
            sequences[user] = list(history)
        sequences[user].append(target)
    return list(sequences.items()) if with_users else list(sequences.values())


def last_rows(rows: Dataset, per_user: int = 1) -> list[int]:
    """Indices of each user's `per_user` most recent rows of a split (rows are in time order per user)."""
    recent: dict[str, list[int]] = {}
    for i, user in enumerate(rows["user"]):
        recent.setdefault(user, []).append(i)
    return sorted(i for indices in recent.values() for i in indices[-per_user:])


def without_last_rows(rows: Dataset) -> Dataset:
    """The split without each user's most recent row: SFT's rows when those targets are held back for RL."""
    held = set(last_rows(rows))
    return rows.select([i for i in range(len(rows)) if i not in held])


def window_bounds(length: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of windows of at most `size` items over a sequence of `length` items, from the end, each
    overlapping the previous one by one item: every transition (item t-1 -> item t) falls in exactly one window."""
    bounds, end = [], length
    while end > 1:
        bounds.append((max(0, end - size), end))
        end -= size - 1
    return bounds


def read_catalog(path: str | Path) -> list[dict]:
    """`catalog.jsonl`: one {"item_id", "title", "identifier", "attributes"} per line, in catalogue order; a line
    that is not such an object (a truncated or edited file) is an error naming the file and line."""
    items, seen = [], {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: invalid JSON at column {err.colno} ({err.msg}); truncated?") from None
        if not isinstance(item, dict) or not {"item_id", "identifier"} <= item.keys():
            raise DataError(f"{path}:{number}: expected an object with item_id and identifier")
        item_id = item["item_id"]
        if item_id in seen:  # one id twice would silently drop an item from the trie
            raise DataError(f"{path}:{number}: item_id {item_id!r} again (first on line {seen[item_id]})")
        seen[item_id] = number
        items.append(item)
    if not items:
        raise DataError(f"{path}: empty catalogue")
    return items


def load_run_data(data_dir: str | Path) -> RunData:
    data_dir = Path(data_dir)
    if not (data_dir / "dataset").is_dir():
        raise RlrecError(f"{data_dir}: no prepared data; run `rlrec data prepare` first")
    dataset = load_from_disk(str(data_dir / "dataset"))
    catalog = read_catalog(data_dir / "catalog.jsonl")
    stats = json.loads((data_dir / "stats.json").read_text(encoding="utf-8"))
    popularity = train_popularity(dataset["train"]) if "train" in dataset else Counter()
    return RunData(data_dir, dataset, [c["item_id"] for c in catalog],
                   {c["item_id"]: c["identifier"] for c in catalog}, popularity, stats, catalog)  # fmt: skip


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


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
        "prompt": to_dict(config.prompt),  # whole: every later stage renders prompts from it (RunData.prompt)
        "identifier_notes": dict(sorted(notes.items())),
        "skipped": dict(sorted(raw.skipped.items())),
        "skipped_examples": dict(sorted(raw.examples.items())),
    }


PURPOSE = "prepared data"


def _prepared_before_markers(folder: Path) -> bool:
    return (folder / "catalog.jsonl").is_file() and (folder / "dataset").is_dir()


def write_prepared(out: Path, dataset: DatasetDict, catalog: Catalog, identifiers: dict[str, str],
                   interactions: Interactions | None, sid_index: dict | None, stats: dict,
                   inputs: Sequence[str | Path] = ()) -> None:  # fmt: skip
    """Replace `out` with the prepared folder (the layout in the module docstring). Only a folder the data stage
    wrote is replaced, never one holding its `inputs` (the source files) or anything else (`rlrec.ownership`)."""
    claim_output(out, PURPOSE, inputs, made_by_rlrec=_prepared_before_markers)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text(PURPOSE + "\n", encoding="utf-8")
    datasets.disable_progress_bars()  # a save takes well under a second; the bars would only be noise
    dataset.save_to_disk(str(out / "dataset"))
    datasets.enable_progress_bars()
    items = catalog.items.items()
    write_jsonl(out / "catalog.jsonl", ({"item_id": i, "title": item.title, "identifier": identifiers[i],
                                         "attributes": item.attributes} for i, item in items))  # fmt: skip
    if interactions is not None:
        stamps = interactions.timestamps
        write_jsonl(out / "sequences.jsonl", ({"user": u, "items": items, "timestamps": stamps[u] if stamps else None}
                                              for u, items in interactions.sequences.items()))  # fmt: skip
    if sid_index is not None:
        (out / "index.json").write_text(json.dumps(sid_index) + "\n", encoding="utf-8")
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
