"""Ranking metrics, pure functions over lists: evaluation and the rank-aware RL rewards (`rlrec.rewards`: ndcg,
rank_penalty) both discount by `discount`, so what GRPO is trained on is what `rlrec eval` reports.

Protocol (docs/evaluation.md): one target per user, full-catalogue ranking, rank r from 1.
    HR@K   = 1[r <= K]                    (= Recall@K with one target)
    NDCG@K = 1 / log2(r + 1)  if r <= K   (the ideal DCG of one relevant item is 1)
    MRR@K  = 1 / r            if r <= K
Beyond accuracy, over all users' top-K lists:
    coverage@K        = |distinct recommended items| / |catalogue|
    ARP@K             = mean train popularity (interaction count) of the recommended items
    long-tail share@K = share of recommended items outside the head (the most popular 20% of items by train count)
    invalid rate      = share of list entries that are not catalogue items (0 under constraint, reported anyway)
    duplicate rate    = share of list entries repeating an earlier entry of the same list
Slices (rlrec.evaluate): cold_hr@K / cold_ndcg@K over the users whose target has <= COLD_MAX_COUNT train counts.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

DEFAULT_KS = (1, 5, 10, 20, 50)
# The cold-item slice: users whose target has at most this many training interactions. Collaborative signal is
# weakest there, so knowledge from outside the logs (a pretrained language model's, item text) has most to add.
COLD_MAX_COUNT = 5


def rank_of(target: str, ranked: Sequence[str]) -> int | None:
    """1-based rank of `target` in `ranked`, None if absent."""
    for position, item in enumerate(ranked, start=1):
        if item == target:
            return position
    return None


def discount(rank: int) -> float:
    """The DCG discount of a 1-based rank: 1 / log2(rank + 1)."""
    return 1.0 / math.log2(rank + 1)


def hit_at_k(rank: int | None, k: int) -> float:
    return 1.0 if rank is not None and rank <= k else 0.0


def ndcg_at_k(rank: int | None, k: int) -> float:
    return discount(rank) if rank is not None and rank <= k else 0.0


def mrr_at_k(rank: int | None, k: int) -> float:
    return 1.0 / rank if rank is not None and rank <= k else 0.0


def accuracy_metrics(ranked_lists: Sequence[Sequence[str]], targets: Sequence[str], ks: Sequence[int]) -> dict:
    """Mean HR@K, NDCG@K and MRR@K over users."""
    if len(ranked_lists) != len(targets):
        raise ValueError(f"{len(ranked_lists)} lists for {len(targets)} targets")
    ranks = [rank_of(t, lst) for t, lst in zip(targets, ranked_lists, strict=True)]
    n = max(len(ranks), 1)
    out = {}
    for k in ks:
        out[f"hr@{k}"] = sum(hit_at_k(r, k) for r in ranks) / n
        out[f"ndcg@{k}"] = sum(ndcg_at_k(r, k) for r in ranks) / n
        out[f"mrr@{k}"] = sum(mrr_at_k(r, k) for r in ranks) / n
    return out


def head_items(popularity: Mapping[str, int], item_ids: Collection[str], head_share: float = 0.2) -> set[str]:
    """The most popular `head_share` of the catalogue by train count (ties broken by item id, for determinism)."""
    ordered = sorted(item_ids, key=lambda item: (-popularity.get(item, 0), item))
    return set(ordered[: int(round(head_share * len(ordered)))])


def beyond_accuracy(
    ranked_lists: Sequence[Sequence[str]], item_ids: Collection[str], popularity: Mapping[str, int],
    ks: Sequence[int], head: set[str] | None = None,
) -> dict:  # fmt: skip
    head = head_items(popularity, item_ids) if head is None else head
    catalogue = set(item_ids)
    entries = sum(len(lst) for lst in ranked_lists)
    invalid = sum(1 for lst in ranked_lists for item in lst if item not in catalogue)
    duplicates = sum(len(lst) - len(set(lst)) for lst in ranked_lists)
    out = {
        "invalid_rate": invalid / entries if entries else 0.0,
        "duplicate_rate": duplicates / entries if entries else 0.0,
        "valid_rate": 1.0 - invalid / entries if entries else 0.0,
    }
    for k in ks:
        top = [item for lst in ranked_lists for item in lst[:k] if item in catalogue]
        out[f"coverage@{k}"] = len(set(top)) / len(catalogue) if catalogue else 0.0
        out[f"arp@{k}"] = sum(popularity.get(i, 0) for i in top) / len(top) if top else 0.0
        out[f"tail_share@{k}"] = sum(1 for i in top if i not in head) / len(top) if top else 0.0
    return out


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of the per-user differences a - b with a 95% percentile bootstrap interval over users (the same users
    resampled for both systems, so user difficulty cancels): (mean, low, high)."""
    import numpy as np

    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired_bootstrap needs two equal, non-empty lists ({len(a)} vs {len(b)})")
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)
