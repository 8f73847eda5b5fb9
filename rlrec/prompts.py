"""Recommendation as text: a (history -> next item) sample becomes chat messages for a language model.

One record per sample, the same columns in every split, so each later stage takes what it needs:
- `prompt`: chat messages ending with the user turn that lists the history (oldest first) and asks for the next item;
- `completion`: the assistant turn holding the target's identifier (SFT trains on it; TRL prompt/completion format);
- `target`, `history`, `user`: ids for rewards, evaluation and preference mining (TRL passes extra columns on to
  reward functions).
"""

from __future__ import annotations

from collections.abc import Mapping

from datasets import Dataset, DatasetDict

from rlrec.data.types import Sample
from rlrec.schema import PromptConfig


def render_history(history: tuple[str, ...] | list[str], identifiers: Mapping[str, str], config: PromptConfig) -> str:
    return config.separator.join(identifiers[item] for item in history)


def prompt_messages(
    history: tuple[str, ...] | list[str], identifiers: Mapping[str, str], config: PromptConfig
) -> list[dict[str, str]]:
    """The chat prompt for one history (also used at inference time by `Recommender.recommend_batch`)."""
    text = config.template.replace("{history}", render_history(history, identifiers, config))
    system = [{"role": "system", "content": config.system}] if config.system else []
    return [*system, {"role": "user", "content": text}]


def to_record(sample: Sample, identifiers: Mapping[str, str], config: PromptConfig) -> dict:
    return {
        "user": sample.user,
        "history": list(sample.history),
        "target": sample.target,
        "prompt": prompt_messages(sample.history, identifiers, config),
        "completion": [{"role": "assistant", "content": identifiers[sample.target]}],
    }


def build_dataset(
    splits: Mapping[str, list[Sample]], identifiers: Mapping[str, str], config: PromptConfig
) -> DatasetDict:
    out = {}
    for name, samples in splits.items():
        records = [to_record(s, identifiers, config) for s in samples]
        columns = ("user", "history", "target", "prompt", "completion")
        out[name] = Dataset.from_dict({c: [r[c] for r in records] for c in columns})
    return DatasetDict(out)


# Item-alignment tasks (LC-Rec, MiniOneRec): teach the model what its identifiers mean by mapping titles to
# semantic IDs and back. Rows keep the columns of next-item rows (empty history, the item as target).
ALIGNMENT_TASKS = {
    "title_to_sid": ('Which item is titled "{title}"?', "sid"),
    "sid_to_title": ("What is the title of item {sid}?", "title"),
}


def alignment_records(catalog_rows: list[dict], task: str) -> list[dict]:
    template, answer = ALIGNMENT_TASKS[task]
    records = []
    for row in catalog_rows:
        values = {"title": row["title"] or f"item {row['item_id']}", "sid": row["identifier"]}
        records.append({
            "user": "", "history": [], "target": row["item_id"],
            "prompt": [{"role": "user", "content": template.format(**values)}],
            "completion": [{"role": "assistant", "content": values[answer]}],
        })  # fmt: skip
    return records


def mix_tasks(next_item: Dataset, catalog_rows: list[dict], weights: Mapping[str, float], seed: int) -> Dataset:
    """The SFT training set: each task's rows repeated `weight` times (a fraction takes a seeded sample), shuffled.
    `next_item` weighs the history -> next item rows; the alignment tasks weigh one row per catalogue item."""
    import numpy as np
    from datasets import concatenate_datasets

    rng = np.random.default_rng(seed)
    parts = []
    for task, weight in weights.items():
        if weight <= 0:
            continue
        rows = next_item if task == "next_item" else Dataset.from_list(alignment_records(catalog_rows, task),
                                                                      features=next_item.features)  # fmt: skip
        whole, fraction = int(weight), weight - int(weight)
        parts.extend([rows] * whole)
        if fraction > 0:
            parts.append(rows.select(sorted(rng.choice(len(rows), int(round(fraction * len(rows))), replace=False))))
    return concatenate_datasets(parts).shuffle(seed=seed)
