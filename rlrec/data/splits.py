"""Train / valid / test splits of next-item samples (the protocols in docs/evaluation.md).

Leave-one-out (P5 / TIGER / LETTER / LC-Rec), per user with items i_1..i_n in time order:
    train  = every prefix of i_1..i_{n-2}: (i_1..i_{t-1}) -> i_t  for t = 2..n-2   (n - 3 samples)
    valid  = (i_1..i_{n-2}) -> i_{n-1}
    test   = (i_1..i_{n-1}) -> i_n      (the valid item is part of the test history)
Users with fewer than 3 items cannot be split and are counted as `user_too_short`.

Global temporal (MiniOneRec / D3 / BIGRec): one sample per interaction after a user's first, all users' samples
sorted by target time (stable), split by `ratios` (8:1:1) in that order. Needs timestamps.

Every history is truncated to its last `max_history` items.
"""

from __future__ import annotations

from collections import Counter

from rlrec.data.types import Interactions, RawData, Sample
from rlrec.errors import ConfigError, DataError
from rlrec.schema import DataConfig

SPLIT_NAMES = ("train", "valid", "test")


def _window(items: list[str], end: int, max_history: int) -> tuple[str, ...]:
    return tuple(items[max(0, end - max_history) : end])


def leave_one_out(interactions: Interactions, max_history: int, skipped: Counter) -> dict[str, list[Sample]]:
    splits: dict[str, list[Sample]] = {name: [] for name in SPLIT_NAMES}
    for user, items in interactions.sequences.items():
        n = len(items)
        if n < 3:
            skipped["user_too_short"] += 1
            continue
        stamps = interactions.timestamps[user] if interactions.timestamps else None
        for t in range(1, n - 2):
            splits["train"].append(
                Sample(user, _window(items, t, max_history), items[t], stamps[t] if stamps else None)
            )
        for name, t in (("valid", n - 2), ("test", n - 1)):
            splits[name].append(Sample(user, _window(items, t, max_history), items[t], stamps[t] if stamps else None))
    return splits


def temporal(
    interactions: Interactions, ratios: tuple[float, float, float], max_history: int
) -> dict[str, list[Sample]]:
    if interactions.timestamps is None:
        raise DataError("split.method 'temporal' needs timestamps, and this source has none; use leave_one_out")
    samples = [
        Sample(user, _window(items, t, max_history), items[t], interactions.timestamps[user][t])
        for user, items in interactions.sequences.items()
        for t in range(1, len(items))
    ]
    samples.sort(key=lambda s: s.timestamp)
    n_train = int(round(len(samples) * ratios[0]))
    n_valid = int(round(len(samples) * ratios[1]))
    return {
        "train": samples[:n_train],
        "valid": samples[n_train : n_train + n_valid],
        "test": samples[n_train + n_valid :],
    }


def truncate(splits: dict[str, list[Sample]], max_history: int) -> dict[str, list[Sample]]:
    """Cut given samples' histories to the last `max_history` items (for pre-split exports)."""
    return {
        name: [Sample(s.user, s.history[-max_history:], s.target, s.timestamp) for s in samples]
        for name, samples in splits.items()
    }


def make_splits(raw: RawData, config: DataConfig, skipped: Counter) -> dict[str, list[Sample]]:
    """The samples of each split, by `config.split.method`."""
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
