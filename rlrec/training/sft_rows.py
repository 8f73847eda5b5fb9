"""SFT training rows in the sequence prompt format (`data.prompt.format: sequence`, rlrec.decoding.inputs), already
tokenised for TRL's `SFTTrainer`: `input_ids` and a `completion_mask` that marks the tokens the loss is on (TRL
turns it into labels with `completion_only_loss`), plus `targets` (the number of items a row teaches, for the
stage's targets per second) and `user`, both dropped before training.

- `target` rows: one per (history, next item) of the train split, loss on the next item's tokens: the prompt the
  evaluation decodes from, then the target.
- `sequence` rows (`sft.rows: sequence`): one per window of a user's training sequence, loss on the tokens of
  every item that has at least `min_history` items before it. A history of n items is encoded once to learn up
  to n targets, where per-target rows encode it n times to learn one each (SASRec trains this way). The windows
  hold max_history + 1 items, so a target never sees more history than at evaluation, and overlap by one item so
  each training transition is learned exactly once (`window_bounds`, as for SASRec).

Only training items are ever in a row: the sequences are rebuilt from the train split (`training_sequences`:
items[:-2] under leave-one-out), never from the valid or test positions. With `hold_out_last` each user's last
training item is left out too (`sft.hold_out_last`): fresh targets for RL (`grpo.train_rows: last`). With
`per_user` (`sft.rows_per_user`) only each user's latest rows are made: the last targets, or the last windows.
"""

from __future__ import annotations

from datasets import Dataset

from rlrec.data.prepared import RunData, last_rows, training_sequences, window_bounds, without_last_rows
from rlrec.decoding.inputs import ModelInputs


def target_rows(data: RunData, inputs: ModelInputs, hold_out_last: bool = False,
                per_user: int | None = None) -> Dataset:  # fmt: skip
    train = without_last_rows(data.rows("train")) if hold_out_last else data.rows("train")
    if per_user is not None:
        train = train.select(last_rows(train, per_user))
    ids, masks = [], []
    for history, target in zip(train["history"], train["target"], strict=True):
        prompt, answer = inputs.history_ids(history), inputs.blocks[target]
        ids.append(prompt + answer)
        masks.append([0] * len(prompt) + [1] * len(answer))
    return Dataset.from_dict({"input_ids": ids, "completion_mask": masks, "targets": [1] * len(ids),
                              "user": list(train["user"])})  # fmt: skip


def sequence_rows(data: RunData, inputs: ModelInputs, min_history: int, hold_out_last: bool = False,
                  per_user: int | None = None) -> Dataset:  # fmt: skip
    size = data.stats["max_history"] + 1
    ids, masks, targets, users = [], [], [], []
    for user, sequence in training_sequences(data, with_users=True):
        sequence = sequence[:-1] if hold_out_last else sequence
        for start, end in window_bounds(len(sequence), size)[:per_user]:  # newest first
            row, mask, learned = list(inputs.prefix), [0] * len(inputs.prefix), 0
            for index in range(start, end):
                block = inputs.blocks[sequence[index]]
                target = index > start and index >= min_history  # it has history, in this window too
                row += block
                mask += [int(target)] * len(block)
                learned += target
            if learned:
                ids.append(row)
                masks.append(mask)
                targets.append(learned)
                users.append(user)
    return Dataset.from_dict({"input_ids": ids, "completion_mask": masks, "targets": targets, "user": users})
