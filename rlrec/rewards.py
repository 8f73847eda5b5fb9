"""Verifiable ranking rewards for the GRPO stage: pure functions over lists, named in the `REWARDS` table.

Every reward sees one rollout batch (`RewardBatch`: the generated item of each completion, the user's target and
history, the completion's beam rank when the rollout was a beam search, and G, the completions per prompt) plus
the run's `ItemTables` (semantic-ID codes, train popularity, text embeddings, co-occurrence), and returns one float
per completion. A recipe names rewards and weights:

    grpo:
      rewards: {hit: 1.0, rank_penalty: 1.0}
      reward_params: {sid_prefix: {schedule: [0.5, 0.707, 0.866]}}

A name with a dot loads a user function by dotted path (`rewards.my_module.my_reward`, same signature). A reward
that raises or returns NaN stops the run with the reward's name in the message.

Ranks are 0-based (the best beam has rank 0); the discounts are `rlrec.metrics.discount(r + 1)`, the one
evaluation uses. Formulas and sources:
- valid         1 if the completion is a catalogue item, else 0 (format reward).
- hit           1 if the item is the target, else 0.
- rank_penalty  MiniOneRec's ranking reward term: a wrong item at beam rank r gets
                -(1/log2(r+2)) / sum_{j<G} 1/log2(j+2); a hit gets 0. `hit + rank_penalty` is their `ranking`.
- ndcg          rank-weighted hit: 1/log2(r+2) when the item at beam rank r is the target, else 0
                (`rlrec.metrics.ndcg_at_k(r + 1, G)`, NDCG@G of the target in the beam list).
- sid_prefix    partial credit by the depth d of the semantic-ID prefix shared with the target (of L levels);
                1 for a hit. Default schedule sqrt(d/L): GREAM's residual-sensitive reward (0.5 / 0.707 / 0.866
                for 1 / 2 / 3 of 4 levels); `linear` (d/L) or an explicit list of L-1 values.
- semantic      cosine similarity of the generated and target items' text embeddings (MiniLM over titles).
- collaborative item-item cosine co-occurrence on the training sequences, |U_i & U_j| / sqrt(|U_i| |U_j|),
                maximised over the user's last `window` history items (item-based CF; Sarwar et al. 2001).
- popularity    -log(1 + n_i) / log(1 + max_j n_j) with n_i the item's train interactions: a penalty in [-1, 0]
                against popularity bias.
- repeat        -1 if the item is already in the user's history, else 0.
- teacher       a trained collaborative model's judgement of the item given the user's history (on-policy
                distillation of the run's SASRec into the generative model; MiniOneRec has a SASRec-score reward
                of this kind). `kind: logprob` (default): log p_teacher(item | history), the log-softmax of its
                score over the catalogue; `kind: ndcg`: 1/log2(rank + 1) of the item in the teacher's full ranking.
                Dense: every completion gets a graded value, so a group carries a gradient without a hit. The
                teacher is the run's `sasrec` stage (`ItemTables.teacher`, supplied by the GRPO stage).
"""

from __future__ import annotations

import difflib
import importlib
import math
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from rlrec.errors import ConfigError, RlrecError
from rlrec.items.embed import embed_texts
from rlrec.items.index import CODE_IN_TEXT
from rlrec.metrics import discount, ndcg_at_k
from rlrec.schema import DEFAULT_ENCODER


@dataclass
class RewardBatch:
    items: list[str | None]  # generated catalogue item per completion (None: not an item)
    targets: list[str]
    histories: list[list[str]]
    ranks: list[int | None]  # beam rank of the completion within its group (None for sampled rollouts)
    group_size: int


@dataclass
class ItemTables:
    """Per-run item facts the rewards read, built lazily: only what a recipe's rewards need is computed."""

    item_ids: list[str]
    identifiers: dict[str, str]
    popularity: Counter
    sequences: list[list[str]] = field(default_factory=list)  # training sequences, for co-occurrence
    titles: dict[str, str] = field(default_factory=dict)
    encoder: str = DEFAULT_ENCODER
    cache_dir: Path = Path("runs/cache")
    # histories -> [len(histories), len(item_ids)] teacher log-probabilities (columns follow item_ids); the GRPO
    # stage supplies it from the run's SASRec when a recipe names the `teacher` reward
    teacher: Callable[[list[list[str]]], np.ndarray] | None = None

    @cached_property
    def position(self) -> dict[str, int]:
        return {item: i for i, item in enumerate(self.item_ids)}

    @cached_property
    def codes(self) -> dict[str, tuple[str, ...]]:
        codes = {item: tuple(CODE_IN_TEXT.findall(text)) for item, text in self.identifiers.items()}
        if not any(codes.values()):
            raise ConfigError("reward 'sid_prefix' needs semantic-ID identifiers (data.prompt.identifier: sid)")
        return codes

    @cached_property
    def embeddings(self) -> dict[str, np.ndarray]:
        texts = [self.titles.get(item) or f"item {item}" for item in self.item_ids]
        vectors, _, _ = embed_texts(texts, self.encoder, 256, self.cache_dir)
        return dict(zip(self.item_ids, vectors, strict=True))

    @cached_property
    def cooccurrence(self) -> tuple[dict[str, set[int]], dict[str, int]]:
        users: dict[str, set[int]] = defaultdict(set)
        for user, sequence in enumerate(self.sequences):
            for item in sequence:
                users[item].add(user)
        return users, {item: len(u) for item, u in users.items()}

    @cached_property
    def log_max_popularity(self) -> float:
        return math.log1p(max(self.popularity.values(), default=1))


RewardFn = Callable[..., list[float]]


def _rank_of(batch: RewardBatch, i: int, name: str) -> int:
    rank = batch.ranks[i]
    if rank is None:
        raise RlrecError(f"reward '{name}' needs beam ranks; use grpo.rollout: beam")
    return rank


def valid(batch: RewardBatch, tables: ItemTables) -> list[float]:
    return [float(item is not None and item in tables.identifiers) for item in batch.items]


def hit(batch: RewardBatch, tables: ItemTables) -> list[float]:
    return [float(item == target) for item, target in zip(batch.items, batch.targets, strict=True)]


def rank_penalty(batch: RewardBatch, tables: ItemTables) -> list[float]:
    total = sum(discount(j + 1) for j in range(batch.group_size))
    return [
        0.0 if item == target else -discount(_rank_of(batch, i, "rank_penalty") + 1) / total
        for i, (item, target) in enumerate(zip(batch.items, batch.targets, strict=True))
    ]


def ndcg(batch: RewardBatch, tables: ItemTables) -> list[float]:
    return [
        ndcg_at_k(_rank_of(batch, i, "ndcg") + 1, batch.group_size) if item == target else 0.0
        for i, (item, target) in enumerate(zip(batch.items, batch.targets, strict=True))
    ]


def prefix_schedule(levels: int, schedule: str | Sequence[float] = "sqrt") -> list[float]:
    """Credit for a shared prefix of depth 0..levels (the last entry, a full match, is always 1)."""
    if schedule == "sqrt":
        return [math.sqrt(d / levels) for d in range(levels + 1)]
    if schedule == "linear":
        return [d / levels for d in range(levels + 1)]
    if isinstance(schedule, str) or len(schedule) != levels - 1:
        raise ConfigError(
            f"reward_params.sid_prefix.schedule: 'sqrt', 'linear' or {levels - 1} values (one per partial depth), "
            f"got {schedule!r}"
        )
    return [0.0, *map(float, schedule), 1.0]


def sid_prefix(batch: RewardBatch, tables: ItemTables, schedule: str | list[float] = "sqrt") -> list[float]:
    codes = tables.codes
    out = []
    for item, target in zip(batch.items, batch.targets, strict=True):
        if item is None:
            out.append(0.0)
            continue
        a, b = codes[item], codes[target]
        credit = prefix_schedule(len(b), schedule)
        depth = 0
        while depth < min(len(a), len(b)) and a[depth] == b[depth]:
            depth += 1
        out.append(1.0 if item == target else credit[min(depth, len(b) - 1)])
    return out


def semantic(batch: RewardBatch, tables: ItemTables) -> list[float]:
    vectors = tables.embeddings
    return [
        0.0 if item is None else float(np.dot(vectors[item], vectors[target]))
        for item, target in zip(batch.items, batch.targets, strict=True)
    ]


def collaborative(batch: RewardBatch, tables: ItemTables, window: int = 5) -> list[float]:
    users, counts = tables.cooccurrence
    out = []
    for item, history in zip(batch.items, batch.histories, strict=True):
        best = 0.0
        for previous in history[-window:] if item is not None else []:
            shared = len(users.get(item, set()) & users.get(previous, set()))
            if shared:
                best = max(best, shared / math.sqrt(counts[item] * counts[previous]))
        out.append(best)
    return out


def popularity(batch: RewardBatch, tables: ItemTables) -> list[float]:
    scale = tables.log_max_popularity
    return [0.0 if item is None else -math.log1p(tables.popularity.get(item, 0)) / scale for item in batch.items]


def teacher(batch: RewardBatch, tables: ItemTables, kind: str = "logprob") -> list[float]:
    if tables.teacher is None:
        raise ConfigError("reward 'teacher' needs the run's SASRec: run `rlrec baseline sasrec` first")
    if kind not in ("logprob", "ndcg"):
        raise ConfigError(f"reward_params.teacher.kind: 'logprob' or 'ndcg', got {kind!r}")
    size = batch.group_size
    histories = batch.histories[::size]  # one teacher pass per group: its G completions share the history
    logprobs = tables.teacher(histories)
    out = []
    for i, item in enumerate(batch.items):
        if item is None:
            out.append(0.0)
            continue
        row = logprobs[i // size]
        value = row[tables.position[item]]
        out.append(float(value) if kind == "logprob" else ndcg_at_k(int((row > value).sum()) + 1, len(row)))
    return out


def repeat(batch: RewardBatch, tables: ItemTables) -> list[float]:
    return [-float(item in set(history)) for item, history in zip(batch.items, batch.histories, strict=True)]


# The built-in rewards by name: one literal table (the names a recipe's grpo.rewards may use, besides dotted paths).
REWARDS: dict[str, RewardFn] = {
    "valid": valid, "hit": hit, "rank_penalty": rank_penalty, "ndcg": ndcg, "sid_prefix": sid_prefix,
    "semantic": semantic, "collaborative": collaborative, "popularity": popularity, "teacher": teacher,
    "repeat": repeat,
}  # fmt: skip
# The ones defined on the beam's rank of each completion: a sampled rollout has no ranks to give them.
NEEDS_BEAM_RANKS = frozenset({"rank_penalty", "ndcg"})


def check_rewards(names: Iterable[str], rollout: str) -> None:
    """Before any model loads: every name resolves (a typo names the nearest built-in), and rank rewards have
    the beam rollout they need."""
    for name in names:
        resolve(name)
    ranked = sorted(NEEDS_BEAM_RANKS & set(names))
    if ranked and rollout != "beam":
        raise ConfigError(f"grpo.rewards {ranked} need beam ranks; use grpo.rollout: beam")


def resolve(name: str) -> RewardFn:
    """A built-in reward by name, or a user function by dotted path (`package.module.function`)."""
    if name in REWARDS:
        return REWARDS[name]
    if "." not in name:
        near = difflib.get_close_matches(name, REWARDS, n=1, cutoff=0.5)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise ConfigError(f"unknown reward '{name}': {hint}built-in: {', '.join(sorted(REWARDS))}, or a dotted path")
    module_name, _, attr = name.rpartition(".")
    if os.getcwd() not in sys.path:  # user rewards live in the project the command runs from (`rewards/...`)
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"reward '{name}': cannot load it ({err})") from None
    if not callable(fn):
        raise ConfigError(f"reward '{name}' is not a function")
    return fn


def compute(name: str, fn: RewardFn, batch: RewardBatch, tables: ItemTables, params: Mapping) -> list[float]:
    """Call one reward and check its output: a raise, a wrong length or a NaN fails with the reward's name."""
    try:
        values = [float(v) for v in fn(batch, tables, **params)]
    except RlrecError:
        raise
    except Exception as err:  # a user reward's bug: name it instead of a bare traceback deep in TRL
        raise RlrecError(f"reward '{name}' raised {type(err).__name__}: {err}") from err
    if len(values) != len(batch.items):
        raise RlrecError(f"reward '{name}' returned {len(values)} values for {len(batch.items)} completions")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise RlrecError(f"reward '{name}' returned a non-finite value ({values[bad[0]]}) for completion {bad[0]}")
    return values
