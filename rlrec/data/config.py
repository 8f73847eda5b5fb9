"""Typed config of the data layer: where the logs come from, how they are split, how samples become text."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from rlrec.errors import ConfigError

SourceFormat = Literal["movielens", "lcrec", "minionerec", "generic", "synthetic"]


@dataclass
class ColumnsConfig:
    """Column names of a generic interactions table (and of its optional items table)."""

    user: str = "user_id"
    item: str = "item_id"
    timestamp: str | None = "timestamp"
    rating: str | None = None
    item_key: str | None = None  # item id column of the items table; defaults to `item`
    title: str = "title"  # title column of the items table; the other columns become attributes


@dataclass
class SyntheticConfig:
    """The embedded default: categories of items, long-tail popularity, next item driven by the last two items."""

    num_users: int = 1000
    num_items: int = 300
    num_categories: int = 10
    min_length: int = 6
    max_length: int = 20
    successors: int = 3  # each item has this many likely next items
    follow_prob: float = 0.85  # otherwise the next item is a popularity draw
    zipf_exponent: float = 1.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_items < self.num_categories or self.num_categories < 1:
            raise ConfigError("synthetic: need 1 <= num_categories <= num_items")
        if not 3 <= self.min_length <= self.max_length:
            raise ConfigError("synthetic: need 3 <= min_length <= max_length (leave-one-out needs 3 items)")
        if not 0.0 <= self.follow_prob <= 1.0:
            raise ConfigError("synthetic.follow_prob must be in [0, 1]")
        if not 1 <= self.successors <= self.num_items // self.num_categories:
            raise ConfigError("synthetic.successors must be between 1 and the items per category")


@dataclass
class SourceConfig:
    format: SourceFormat
    path: str | None = None  # folder (movielens, lcrec, minionerec) or interactions file (generic)
    name: str | None = None  # lcrec / minionerec file stem; found automatically when the folder holds one
    items_path: str | None = None  # generic: optional items table (csv, tsv, parquet, jsonl)
    index_path: str | None = None  # a semantic-ID index.json to use instead of the one beside the data
    encoding: str | None = None  # default: latin-1 for MovieLens, utf-8 otherwise
    delimiter: str | None = None  # generic csv; default by extension (.tsv -> tab)
    columns: ColumnsConfig | None = None  # generic only
    synthetic: SyntheticConfig | None = None  # synthetic only
    min_rating: float | None = None  # keep interactions rated at least this (sources with ratings only)
    kcore: int = 0  # iterative k-core filter on users and items; 0 = off
    drop_repeat_items: bool = False  # keep only a user's first interaction with an item (the LC-Rec convention)
    on_error: Literal["raise", "skip"] = "raise"  # skip = count bad rows by reason in stats.json

    def __post_init__(self) -> None:
        if self.format == "synthetic":
            self.synthetic = self.synthetic or SyntheticConfig()
        elif self.synthetic is not None:
            raise ConfigError(f"source.synthetic is only for format 'synthetic', not '{self.format}'")
        elif self.path is None:
            raise ConfigError(f"source.path is required for format '{self.format}'")
        if self.format == "generic":
            self.columns = self.columns or ColumnsConfig()
        elif self.columns is not None:
            raise ConfigError(f"source.columns is only for format 'generic', not '{self.format}'")
        if self.items_path is not None and self.format != "generic":
            raise ConfigError("source.items_path is only for format 'generic'")
        if self.kcore < 0:
            raise ConfigError("source.kcore must be >= 0")
        if self.path is not None:
            self.path = os.path.expanduser(os.path.expandvars(self.path))


@dataclass
class SplitConfig:
    """`leave_one_out` (P5/TIGER), `temporal` (global chronological ratio split, MiniOneRec/D3/BIGRec), or
    `given` (the export's own splits, MiniOneRec CSVs).

    `train_from: valid` is for exports without a train split (the public MiniOneRec snapshot): the given valid rows
    become the training rows, except the last `holdout` share of them (file order), which becomes the valid split
    that early stopping and the guards select on; the given test rows stay untouched."""

    method: Literal["leave_one_out", "temporal", "given"] = "leave_one_out"
    max_history: int = 20
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    train_from: Literal["train", "valid"] = "train"  # given splits only
    holdout: float = 0.1  # train_from: valid only

    def __post_init__(self) -> None:
        if self.max_history < 1:
            raise ConfigError("split.max_history must be >= 1")
        if self.train_from == "valid" and self.method != "given":
            raise ConfigError("split.train_from: valid only applies to split.method: given")
        if not 0.0 < self.holdout < 1.0:
            raise ConfigError(f"split.holdout must be in (0, 1), got {self.holdout}")
        if any(r < 0 for r in self.ratios) or abs(sum(self.ratios) - 1.0) > 1e-6:
            raise ConfigError(f"split.ratios must be three non-negative numbers summing to 1, got {self.ratios}")


@dataclass
class PromptConfig:
    """Recommendation-as-text: how a history and its next item become chat messages."""

    identifier: Literal["title", "id", "sid"] = "title"
    system: str | None = None
    template: str = (
        "The user interacted with these items in order: {history}. Which item will the user interact with next?"
    )
    separator: str = ", "

    def __post_init__(self) -> None:
        if "{history}" not in self.template:
            raise ConfigError("prompt.template must contain the placeholder {history}")


@dataclass
class DataConfig:
    source: SourceConfig
    split: SplitConfig = field(default_factory=SplitConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
