"""Preference data for the DPO stage: per training prompt, the target as "chosen" and K "rejected" items.

The rejected items come from configured sources, in this order: `hard` (the current model's constrained top beam,
the items it would recommend instead of the target), `history` (the user's own earlier items, most recent first),
`popular` (drawn in proportion to training popularity) and `random` (uniform over the catalogue). Sampled sources
skip the user's history (known positives). The target, items outside the catalogue and repeats are filtered and
counted; a prompt with fewer negatives than asked is filled with random items, dropped, or an error
(`negatives.on_shortfall`), and counted. Completions are the items' token sequences from the catalogue trie, so
a preference pair scores exactly what constrained decoding emits.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset

from rlrec.decoding import recommend
from rlrec.decoding.inputs import ModelInputs
from rlrec.errors import RlrecError
from rlrec.schema import NegativesConfig


def mine_hard_negatives(model, tokenizer, inputs: ModelInputs, rows, count: int, exclude_history: bool,
                        batch_size: int) -> list[list[str]]:  # fmt: skip
    """The model's constrained top `count + 1` items per prompt (one more than asked: the target may be among them
    and is filtered later). Under an `exclude_history` protocol the history is banned, as at evaluation."""
    exclude = rows["history"] if exclude_history else None
    results = recommend(model, tokenizer, inputs.prompt_ids(tokenizer, rows), count + 1, inputs.trie,
                        batch_size=batch_size, exclude=exclude)  # fmt: skip
    return [[item for item, _ in ranked] for ranked in results]


def _take(candidates, want: int, target: str, history: list[str], chosen: list[str], catalogue: set[str],
          report: dict, sampled: bool) -> None:  # fmt: skip
    """Append up to `want` valid negatives from `candidates` to `chosen`, counting what is filtered."""
    taken = 0
    for item in candidates:
        if taken == want:
            return
        if item == target:
            report["target_removed"] += 1
        elif item not in catalogue:
            report["unknown_removed"] += 1
        elif item in chosen:
            report["repeats_removed"] += 0 if sampled else 1  # a sampled source has spares
        elif sampled and item in history:
            continue  # a known positive of this user: draw again
        else:
            chosen.append(item)
            taken += 1


def build_preferences(rows, item_ids: list[str], popularity, negatives: NegativesConfig,
                      hard: list[list[str]] | None, seed: int) -> tuple[list[dict], dict]:  # fmt: skip
    """(prompt, chosen target, K rejected items) per row, and the counts of what was filtered, filled or dropped."""
    rng = np.random.default_rng(seed)
    catalogue = set(item_ids)
    weights = np.array([popularity.get(item, 0) + 1 for item in item_ids], dtype=float)  # add-one: none impossible
    weights /= weights.sum()
    report = {"prompts": 0, "negatives_per_prompt": negatives.total, "target_removed": 0, "unknown_removed": 0,
              "repeats_removed": 0, "short_prompts": 0, "filled_random": 0, "dropped_prompts": 0}  # fmt: skip
    records: list[dict] = []
    for i in range(len(rows["prompt"])):
        target, history = rows["target"][i], list(rows["history"][i])
        chosen: list[str] = []
        # Sampled sources draw distinct items, enough that the target, the history and the negatives already
        # taken cannot exhaust them; only a catalogue smaller than that comes up short.
        size = min(len(item_ids), 2 * negatives.total + len(history) + 1)

        def draw(p=None, size=size):
            return [item_ids[j] for j in rng.choice(len(item_ids), size=size, replace=False, p=p)]

        sources = [
            (hard[i] if hard is not None else [], negatives.hard, False),
            (reversed(history), negatives.history, False),
            (draw(weights) if negatives.popular else [], negatives.popular, True),
            (draw() if negatives.random else [], negatives.random, True),
        ]
        for candidates, want, sampled in sources:
            _take(candidates, want, target, history, chosen, catalogue, report, sampled)
        missing = negatives.total - len(chosen)
        if missing:
            report["short_prompts"] += 1
            if negatives.on_shortfall == "error":
                raise RlrecError(f"user {rows['user'][i]}: found {len(chosen)} of {negatives.total} negatives "
                                 f"(target {target}, history of {len(history)}); lower dpo.negatives or set "
                                 "dpo.negatives.on_shortfall: fill_random / drop")  # fmt: skip
            if negatives.on_shortfall == "drop":
                report["dropped_prompts"] += 1
                continue
            _take(draw(), missing, target, history, chosen, catalogue, report, True)
            report["filled_random"] += missing - (negatives.total - len(chosen))
            if len(chosen) < negatives.total:
                raise RlrecError(f"the catalogue has too few items for {negatives.total} negatives per prompt")
        records.append({"prompt": rows["prompt"][i], "history": history, "chosen": target, "rejected": chosen})
        report["prompts"] += 1
    return records, report


def tokenize_preferences(records: list[dict], tokenizer, inputs: ModelInputs, pairwise: bool) -> Dataset:
    """Token ids from the catalogue trie: pairwise rows (one per negative) for DPO, one row per prompt for S-DPO."""
    trie = inputs.trie
    position = {item: i for i, item in enumerate(trie.item_ids)}
    prompt_ids = inputs.prompt_ids(tokenizer, {"prompt": [r["prompt"] for r in records],
                                               "history": [r["history"] for r in records]})  # fmt: skip
    columns: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for ids, record in zip(prompt_ids, records, strict=True):
        chosen = trie.sequences[position[record["chosen"]]]
        rejected = [trie.sequences[position[item]] for item in record["rejected"]]
        for negative in rejected if pairwise else [rejected]:
            columns["prompt_ids"].append(ids)
            columns["chosen_ids"].append(chosen)
            columns["rejected_ids"].append(negative)
    return Dataset.from_dict(columns)
