"""Splits worked out by hand (see ../shared/notes/evaluation-protocol.md)."""

from __future__ import annotations

from collections import Counter

import pytest

from rlrec.data.splits import leave_one_out, temporal
from rlrec.data.types import Interactions, Sample
from rlrec.errors import DataError


def test_leave_one_out_by_hand():
    interactions = Interactions({"u": ["a", "b", "c", "d", "e"], "short": ["x", "y"]})
    skipped = Counter()
    splits = leave_one_out(interactions, max_history=2, skipped=skipped)
    assert splits["train"] == [Sample("u", ("a",), "b"), Sample("u", ("a", "b"), "c")]
    assert splits["valid"] == [Sample("u", ("b", "c"), "d")]  # history = items[:-2], truncated to 2
    assert splits["test"] == [Sample("u", ("c", "d"), "e")]  # the valid item is in the test history
    assert skipped == Counter(user_too_short=1)


def test_leave_one_out_never_trains_on_valid_or_test_targets():
    sequences = {f"u{i}": [f"{i}-{j}" for j in range(3 + i)] for i in range(20)}
    splits = leave_one_out(Interactions(sequences), max_history=50, skipped=Counter())
    for split in ("valid", "test"):
        held_out = {(s.user, s.target) for s in splits[split]}
        trained = {(s.user, s.target) for s in splits["train"]} | {
            (s.user, item) for s in splits["train"] for item in s.history
        }
        assert not held_out & trained


def test_temporal_split_orders_by_target_time():
    interactions = Interactions(
        {"u": ["a", "b", "c", "d"], "v": ["x", "y", "z"]},
        {"u": [1, 2, 5, 9], "v": [3, 4, 7]},
    )
    splits = temporal(interactions, (0.6, 0.2, 0.2), max_history=10)
    ordered = [s.timestamp for name in ("train", "valid", "test") for s in splits[name]]
    assert ordered == [2, 4, 5, 7, 9]
    assert [len(splits[n]) for n in ("train", "valid", "test")] == [3, 1, 1]
    assert splits["test"] == [Sample("u", ("a", "b", "c"), "d", 9)]


def test_temporal_needs_timestamps():
    with pytest.raises(DataError, match="needs timestamps"):
        temporal(Interactions({"u": ["a", "b"]}), (0.8, 0.1, 0.1), 10)
