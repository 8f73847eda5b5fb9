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

from rlrec.data.config import PromptConfig
from rlrec.data.types import Sample


def render_history(history: tuple[str, ...] | list[str], identifiers: Mapping[str, str], config: PromptConfig) -> str:
    return config.separator.join(identifiers[item] for item in history)


def prompt_messages(
    history: tuple[str, ...] | list[str], identifiers: Mapping[str, str], config: PromptConfig
) -> list[dict[str, str]]:
    """The chat prompt for one history (also used at inference time by `recommend`)."""
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
