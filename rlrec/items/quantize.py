"""Residual quantisation of item embeddings into L levels of codes: k-means and RQ-KMeans.

k-means: k-means++ seeding, then Lloyd iterations; an emptied cluster is re-seeded with the point farthest from
its centroid. `balanced=True` replaces the nearest-centroid step with a capacity-constrained assignment
(each cluster takes at most ceil(N / K) points; pairs are taken greedily in order of increasing distance), the
balanced variant used by OneRec-style RQ-KMeans to spread items evenly over codes.

RQ-KMeans (residual k-means, as in OneRec / MiniOneRec's `rqkmeans`): with r_0 = x,
    c_l = kmeans(r_{l-1}, K_l),   code_l(i) = argmin_k ||r_{l-1,i} - c_{l,k}||,   r_l = r_{l-1} - c_l[code_l]
so each level encodes what the previous levels left unexplained, and items with similar text share prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centroids = [x[first]]
    closest = torch.cdist(x, x[first : first + 1]).squeeze(1) ** 2
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than k: duplicate a random point
            pick = int(torch.randint(n, (1,), generator=gen))
        else:
            pick = int(torch.multinomial(closest / total, 1, generator=gen))
        centroids.append(x[pick])
        closest = torch.minimum(closest, torch.cdist(x, x[pick : pick + 1]).squeeze(1) ** 2)
    return torch.stack(centroids)


def balanced_assign(dist: torch.Tensor) -> torch.Tensor:
    """Assign each row to a column, at most ceil(N / K) rows per column.

    In rounds: every unassigned row bids for its nearest column that is not yet full; each column accepts its
    closest bidders up to its remaining capacity. Closest-first per column, like a greedy pass over all pairs in
    order of distance, but vectorised (a handful of rounds instead of N * K Python steps)."""
    n, k = dist.shape
    capacity = -(-n // k)
    assign = torch.full((n,), -1, dtype=torch.long)
    load = torch.zeros(k, dtype=torch.long)
    while (assign < 0).any():
        rows = torch.nonzero(assign < 0).flatten()
        masked = dist[rows].masked_fill((load >= capacity).unsqueeze(0), float("inf"))
        choice = masked.argmin(dim=1)
        # Sort bidders by distance, then (stably) by column: each column's bidders end up closest first.
        order = torch.argsort(dist[rows, choice], stable=True)
        rows, choice = rows[order], choice[order]
        order = torch.argsort(choice, stable=True)
        rows, choice = rows[order], choice[order]
        counts = torch.bincount(choice, minlength=k)
        rank = torch.arange(len(choice)) - (torch.cumsum(counts, 0) - counts)[choice]
        accept = rank < (capacity - load)[choice]
        assign[rows[accept]] = choice[accept]
        load += torch.bincount(choice[accept], minlength=k)
    return assign


def kmeans(
    x: torch.Tensor, k: int, iters: int = 50, seed: int = 0, balanced: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (centroids [k, d], assignment [n])."""
    gen = torch.Generator().manual_seed(seed)
    centroids = _kmeans_pp(x, k, gen)
    assign = torch.zeros(x.shape[0], dtype=torch.long)
    for _ in range(iters):
        dist = torch.cdist(x, centroids)
        new_assign = balanced_assign(dist) if balanced else dist.argmin(dim=1)
        counts = torch.bincount(new_assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, new_assign, x)
        moved = centroids.clone()
        filled = counts > 0
        moved[filled] = sums[filled] / counts[filled].unsqueeze(1)
        if not filled.all():  # re-seed each empty cluster with one of the worst-served points
            served = dist.gather(1, new_assign.unsqueeze(1)).squeeze(1)
            empties = torch.nonzero(~filled).flatten()
            for empty, far in zip(empties.tolist(), served.topk(len(empties)).indices.tolist(), strict=True):
                moved[empty] = x[far]
                new_assign[far] = empty
        converged = torch.equal(new_assign, assign)
        centroids, assign = moved, new_assign
        if converged:
            break
    return centroids, assign


@dataclass
class Quantized:
    codes: np.ndarray  # [n, levels] int
    last_residual: np.ndarray  # [n, d] input of the last level, to rank alternative last-level codes
    centroids: list[np.ndarray]  # per level [K_l, d]

    def last_level_preferences(self) -> np.ndarray:
        """For each item, the last-level codes from nearest to farthest (used to resolve collisions)."""
        dist = torch.cdist(torch.from_numpy(self.last_residual), torch.from_numpy(self.centroids[-1]))
        return torch.argsort(dist, dim=1).numpy()


def rq_kmeans(x: np.ndarray, sizes: list[int], iters: int, seed: int, balanced: bool) -> Quantized:
    residual = torch.from_numpy(np.asarray(x, dtype=np.float32))
    codes = np.zeros((residual.shape[0], len(sizes)), dtype=np.int64)
    books: list[np.ndarray] = []
    last_input = residual
    for level, k in enumerate(sizes):
        last_input = residual
        centroids, assign = kmeans(residual, k, iters=iters, seed=seed + level, balanced=balanced)
        codes[:, level] = assign.numpy()
        books.append(centroids.numpy())
        residual = residual - centroids[assign]
    return Quantized(codes, last_input.numpy(), books)
