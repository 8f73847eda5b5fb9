"""The canonical in-memory form every reader produces and every later stage consumes.

- `Catalog`: item id -> `Item` (title and string attributes). Item ids are strings everywhere, whatever the source
  used (MovieLens ints, LC-Rec 0-based ints, arbitrary CSV keys), so that no stage mixes `1` and `"1"`.
- `Interactions`: user -> chronologically ordered item ids, with parallel timestamps where the source has them.
- `Sample`: one (user, history, target) example; splits are lists of samples.
- `BadRows`: the one place where a reader reports a bad row. With `on_error="raise"` the first bad row stops the
  read with a message naming the file and line; with `"skip"` it is counted by reason (and the first message kept
  as an example) so that `stats.json` can say exactly what was dropped. Nothing is dropped silently.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from rlrec.errors import DataError

OnError = Literal["raise", "skip"]


@dataclass
class Item:
    item_id: str
    title: str
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass
class Catalog:
    """Item id -> Item, in a stable order (the source's order)."""

    items: dict[str, Item]

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.items

    def __getitem__(self, item_id: str) -> Item:
        return self.items[item_id]

    def ids(self) -> list[str]:
        return list(self.items)


@dataclass
class Interactions:
    """User -> item ids in chronological order; `timestamps` is parallel to `sequences` or None."""

    sequences: dict[str, list[str]]
    timestamps: dict[str, list[int]] | None = None

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_interactions(self) -> int:
        return sum(len(items) for items in self.sequences.values())

    def item_ids(self) -> set[str]:
        return {item for items in self.sequences.values() for item in items}


@dataclass(frozen=True)
class Sample:
    """One next-item example: `history` (oldest first) -> `target`."""

    user: str
    history: tuple[str, ...]
    target: str
    timestamp: int | None = None


@dataclass
class RawData:
    """What a reader returns. Pre-split exports (MiniOneRec) fill `given_splits` instead of `interactions`."""

    catalog: Catalog
    interactions: Interactions | None = None
    given_splits: dict[str, list[Sample]] | None = None
    sid_index: dict[str, list[str]] | None = None  # as read; rlrec.items validates it
    sid_index_source: str | None = None  # the file it came from, for error messages
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)


class BadRows:
    """Raise on the first bad row, or count it by reason; see the module docstring."""

    def __init__(self, on_error: OnError = "raise") -> None:
        self.on_error = on_error
        self.counts: Counter = Counter()
        self.examples: dict[str, str] = {}

    def __call__(self, reason: str, message: str) -> None:
        if self.on_error == "raise":
            hint = " (set source.on_error: skip to skip and count such rows)"
            raise DataError(message + hint)
        self.counts[reason] += 1
        self.examples.setdefault(reason, message)

    def attach(self, raw: RawData) -> RawData:
        raw.skipped.update(self.counts)
        for reason, message in self.examples.items():
            raw.examples.setdefault(reason, message)
        return raw
