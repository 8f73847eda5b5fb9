"""From raw events to chronological sequences, and the usual dataset filters (rating threshold, k-core).

Ordering rule: a user's events are sorted by timestamp with a *stable* sort, so events in the same second keep
their file order (MovieLens has many such ties; sorting them by item id, as some scripts do, invents an order).
Sources without timestamps keep file order.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from rlrec.data.types import Interactions


@dataclass(frozen=True)
class Event:
    user: str
    item: str
    timestamp: int | None


def events_to_interactions(events: list[Event], drop_repeat_items: bool, skipped: Counter) -> Interactions:
    """Group events by user in chronological order. Exact duplicate events (same user, item and time) are
    dropped and counted as `duplicate_event`; with `drop_repeat_items` only a user's first interaction with each
    item is kept (counted as `repeat_item`)."""
    by_user: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        by_user[event.user].append(event)
    has_time = any(e.timestamp is not None for e in events)
    sequences: dict[str, list[str]] = {}
    timestamps: dict[str, list[int]] = {}
    for user, user_events in by_user.items():
        if has_time:
            user_events = sorted(user_events, key=lambda e: e.timestamp)
        seen_events: set[tuple[str, int | None]] = set()
        seen_items: set[str] = set()
        kept: list[Event] = []
        for event in user_events:
            if (event.item, event.timestamp) in seen_events:
                skipped["duplicate_event"] += 1
                continue
            seen_events.add((event.item, event.timestamp))
            if drop_repeat_items and event.item in seen_items:
                skipped["repeat_item"] += 1
                continue
            seen_items.add(event.item)
            kept.append(event)
        sequences[user] = [e.item for e in kept]
        if has_time:
            timestamps[user] = [e.timestamp for e in kept]
    return Interactions(sequences, timestamps if has_time else None)


def drop_repeats(interactions: Interactions, skipped: Counter) -> Interactions:
    """Keep only each user's first interaction with an item, for sources that arrive as sequences."""
    sequences, timestamps = {}, {} if interactions.timestamps is not None else None
    for user, items in interactions.sequences.items():
        keep = []
        seen: set[str] = set()
        for position, item in enumerate(items):
            if item in seen:
                skipped["repeat_item"] += 1
                continue
            seen.add(item)
            keep.append(position)
        sequences[user] = [items[p] for p in keep]
        if timestamps is not None:
            timestamps[user] = [interactions.timestamps[user][p] for p in keep]
    return Interactions(sequences, timestamps)


def kcore(interactions: Interactions, k: int, skipped: Counter) -> Interactions:
    """Iteratively drop users and items with fewer than `k` interactions until every one left has at least `k`.
    Removed interactions are counted as `kcore_interactions`, removed users as `kcore_users`."""
    if k <= 0:
        return interactions
    sequences = {u: list(items) for u, items in interactions.sequences.items()}
    stamps = {u: list(ts) for u, ts in interactions.timestamps.items()} if interactions.timestamps else None
    while True:
        item_counts = Counter(item for items in sequences.values() for item in items)
        rare = {item for item, count in item_counts.items() if count < k}
        changed = False
        for user in list(sequences):
            keep = [i for i, item in enumerate(sequences[user]) if item not in rare]
            if len(keep) != len(sequences[user]):
                skipped["kcore_interactions"] += len(sequences[user]) - len(keep)
                sequences[user] = [sequences[user][i] for i in keep]
                if stamps is not None:
                    stamps[user] = [stamps[user][i] for i in keep]
                changed = True
            if len(sequences[user]) < k:
                skipped["kcore_interactions"] += len(sequences[user])
                skipped["kcore_users"] += 1
                del sequences[user]
                if stamps is not None:
                    del stamps[user]
                changed = True
        if not changed:
            return Interactions(sequences, stamps)
