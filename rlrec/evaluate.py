"""The evaluation harness: every model and baseline is scored here, on the same rows, by the same metrics.

Protocol (../shared/notes/evaluation-protocol.md): the run's data split (leave-one-out by default), one row per
user, the full catalogue as candidates (no sampled negatives), history items kept as candidates unless
`exclude_history` (then for every system in the table). A generative model's list is its constrained top-K beam
(`rlrec.decoding.recommend`, beam width >= K); a scoring model (SASRec, most-popular) ranks all items by score.
`metrics.json` records the protocol next to the numbers, and a table never mixes protocols.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from datasets import Dataset, load_from_disk

from rlrec.errors import ConfigError, RlrecError
from rlrec.metrics import DEFAULT_KS, accuracy_metrics, beyond_accuracy, head_items

TABLE_COLUMNS = ("hr@1", "hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr@10", "coverage@10",
                 "tail_share@10", "valid_rate")  # fmt: skip


@dataclass
class EvalConfig:
    split: Literal["valid", "test"] = "test"
    ks: list[int] = field(default_factory=lambda: list(DEFAULT_KS))
    beam_width: int | None = None  # default: max(ks)
    batch_size: int = 16
    exclude_history: bool = False
    max_users: int | None = None  # evaluate the first N rows only (quick checks; recorded in metrics.json)
    model: str | None = None  # a model or adapter folder; default: the run's latest trained stage
    baselines: list[Literal["most_popular", "sasrec"]] = field(default_factory=lambda: ["most_popular"])

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ConfigError("eval.ks must be positive integers")
        if self.beam_width is not None and self.beam_width < max(self.ks):
            raise ConfigError(f"eval.beam_width ({self.beam_width}) must be >= max(ks) ({max(self.ks)})")


@dataclass
class RunData:
    """What every evaluator reads from `runs/<name>/data/`."""

    path: Path
    dataset: object  # DatasetDict
    item_ids: list[str]  # the catalogue, in order
    identifiers: dict[str, str]
    popularity: Counter  # train interaction counts
    stats: dict
    catalog: list[dict] = field(default_factory=list)  # catalog.jsonl rows (item_id, title, identifier, ...)

    def rows(self, split: str, max_users: int | None = None) -> Dataset:
        if split not in self.dataset:
            raise RlrecError(f"{self.path}: the data has no '{split}' split (has {', '.join(self.dataset)})")
        rows = self.dataset[split]
        return rows.select(range(min(max_users, len(rows)))) if max_users else rows

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


def read_catalog(path: str | Path) -> list[dict]:
    """`catalog.jsonl`: one {"item_id", "title", "identifier", "attributes"} per line, in catalogue order."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


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


def topk_from_scores(
    scores: torch.Tensor, k: int, item_ids: Sequence[str], exclude: Sequence[Sequence[str]] | None = None
) -> list[list[str]]:
    """Top-k item ids per row of a [users, items] score matrix (columns follow `item_ids`)."""
    if exclude is not None:
        position = {item: i for i, item in enumerate(item_ids)}
        scores = scores.clone()
        for row, items in enumerate(exclude):
            scores[row, [position[i] for i in items if i in position]] = float("-inf")
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices.tolist()
    return [[item_ids[i] for i in row] for row in top]


def score_lists(lists: Sequence[Sequence[str]], targets: Sequence[str], data: RunData, ks: Sequence[int]) -> dict:
    head = head_items(data.popularity, data.item_ids)
    metrics = accuracy_metrics(lists, targets, ks)
    metrics.update(beyond_accuracy(lists, data.item_ids, data.popularity, ks, head))
    return {key: round(value, 6) for key, value in metrics.items()}


def markdown_table(results: Mapping[str, Mapping[str, float]], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    columns = [c for c in columns if any(c in r for r in results.values())]
    lines = ["| system | " + " | ".join(c.upper().replace("_", " ") for c in columns) + " |",
             "|---|" + "---|" * len(columns)]  # fmt: skip
    for name, metrics in results.items():
        cells = [f"{metrics[c]:.4f}" if c in metrics else "-" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, results: Mapping[str, Mapping], data: RunData, config: EvalConfig, extra: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    protocol = {**data.protocol, "split": config.split, "exclude_history": config.exclude_history,
                "num_users": extra.pop("num_users"), "max_users": config.max_users}  # fmt: skip
    payload = {"protocol": protocol, "results": results, **extra}
    (out / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    header = (f"Protocol: {protocol['split_method']} ({config.split} split, {protocol['num_users']} users), "
              f"full catalogue of {protocol['num_items']} items, history <= {protocol['max_history']}, "
              f"exclude_history={config.exclude_history}.\n\n")  # fmt: skip
    (out / "metrics.md").write_text(header + markdown_table({k: v["metrics"] for k, v in results.items()}))
