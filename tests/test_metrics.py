"""Metric values worked out by hand."""

from __future__ import annotations

import math

import pytest

from rlrec.metrics import accuracy_metrics, beyond_accuracy, head_items, ndcg_at_k, rank_of


def test_ranks_and_single_values():
    assert rank_of("b", ["a", "b", "c"]) == 2 and rank_of("z", ["a"]) is None
    assert ndcg_at_k(1, 10) == 1.0
    assert ndcg_at_k(3, 10) == pytest.approx(0.5)  # 1 / log2(4)
    assert ndcg_at_k(3, 2) == 0.0 and ndcg_at_k(None, 10) == 0.0


def test_accuracy_by_hand():
    lists = [["a", "b", "c"], ["c", "a", "b"], ["b", "c", "a"], ["x", "y", "z"]]
    targets = ["a", "a", "a", "a"]  # ranks 1, 2, 3, none
    m = accuracy_metrics(lists, targets, [1, 2, 3])
    assert m["hr@1"] == 0.25 and m["hr@2"] == 0.5 and m["hr@3"] == 0.75
    assert m["ndcg@3"] == pytest.approx((1 + 1 / math.log2(3) + 0.5) / 4)
    assert m["mrr@3"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 4)
    assert m["mrr@1"] == 0.25


def test_beyond_accuracy_by_hand():
    catalog = ["a", "b", "c", "d", "e"]
    popularity = {"a": 10, "b": 5, "c": 1}  # head (top 20% of 5 items = 1 item) = {a}
    assert head_items(popularity, catalog) == {"a"}
    lists = [["a", "b"], ["a", "c"], ["zz", "a"], ["b", "b"]]
    m = beyond_accuracy(lists, catalog, popularity, [1, 2])
    assert m["invalid_rate"] == pytest.approx(1 / 8) and m["valid_rate"] == pytest.approx(7 / 8)
    assert m["duplicate_rate"] == pytest.approx(1 / 8)
    assert m["coverage@1"] == pytest.approx(2 / 5)  # top-1 valid: a, a, b -> {a, b}
    assert m["coverage@2"] == pytest.approx(3 / 5)  # {a, b, c}
    assert m["arp@1"] == pytest.approx((10 + 10 + 5) / 3)
    assert m["tail_share@2"] == pytest.approx(4 / 7)  # valid top-2 entries: a b a c a b b -> b c b b not head


def test_paired_bootstrap_interval_covers_the_difference_and_detects_none():
    from rlrec.metrics import paired_bootstrap

    a = [1.0, 0.0, 1.0, 1.0] * 50
    b = [0.0, 0.0, 1.0, 1.0] * 50
    mean, low, high = paired_bootstrap(a, b)
    assert mean == pytest.approx(0.25) and 0 < low < 0.25 < high < 0.5
    mean, low, high = paired_bootstrap(a, a)
    assert mean == low == high == 0.0
    with pytest.raises(ValueError, match="equal"):
        paired_bootstrap([1.0], [1.0, 0.0])
