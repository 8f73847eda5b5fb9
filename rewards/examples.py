"""An example user reward: same signature as the built-ins in `rlrec.rewards`.

grpo:
  rewards: {hit: 1.0, rewards.examples.novelty: 0.2}
"""

from __future__ import annotations

import math


def novelty(batch, tables) -> list[float]:
    """Self-information of the item under train popularity, scaled to [0, 1]: rarer items score higher."""
    total = sum(tables.popularity.values()) or 1
    worst = math.log2(total)
    return [0.0 if item is None else -math.log2(max(tables.popularity.get(item, 0), 1) / total) / worst
            for item in batch.items]  # fmt: skip
