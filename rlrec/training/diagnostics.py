"""Warnings a user sees while post-training, with the numbers, when the run is not learning what it should.

Read from the trainer's own logs (a `TrainerCallback.on_log`), each warning printed once to stderr and kept in
the stage's `metrics.json` (`training.warnings`):

- no learning signal (GRPO): the share of rollout groups whose rewards are all equal (TRL's
  `frac_reward_zero_std`) averages >= `zero_variance` over the last `window` logged steps. Such a group has zero
  advantage and moves nothing; with a sparse `hit` reward on a large catalogue most groups are like this.
- likelihood displacement (DPO / S-DPO): the target's log-probability (`logps/chosen`) has fallen by more than
  `displacement` nats below its first logged value, while the margin over the negatives may still grow: the
  model pushes the negatives down faster than it keeps the target up, which costs ranking quality.
The guard (`rlrec.training.guard`) adds the third: validation fell for `patience` evaluations.
"""

from __future__ import annotations

import sys
from collections import deque

from transformers import TrainerCallback

from rlrec.training.arguments import is_main_process


class Diagnostics(TrainerCallback):
    def __init__(self, label: str, window: int = 10, zero_variance: float = 0.5, displacement: float = 0.5) -> None:
        self.label, self.window, self.zero_variance, self.displacement = label, window, zero_variance, displacement
        self.zero_std: deque[float] = deque(maxlen=window)
        self.first_chosen: float | None = None
        self.warnings: list[dict] = []

    def warn(self, kind: str, step: int, message: str, **numbers) -> None:
        if any(w["kind"] == kind for w in self.warnings):
            return
        self.warnings.append({"kind": kind, "step": step, "message": message, **numbers})
        if is_main_process():
            print(f"rlrec {self.label} warning (step {step}): {message}", file=sys.stderr, flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs, step = logs or {}, state.global_step
        if "frac_reward_zero_std" in logs:
            self.zero_std.append(float(logs["frac_reward_zero_std"]))
            share = sum(self.zero_std) / len(self.zero_std)
            if len(self.zero_std) >= min(self.window, 3) and share >= self.zero_variance:
                self.warn("zero_variance", step, f"{share:.0%} of rollout groups had all-equal rewards over the last "
                          f"{len(self.zero_std)} logged steps, so they carry no gradient: add a graded reward "
                          "(ndcg, sid_prefix, teacher) or use sample rollouts", share=round(share, 4))  # fmt: skip
        if "logps/chosen" in logs:
            chosen = float(logs["logps/chosen"])
            if self.first_chosen is None:
                self.first_chosen = chosen
            elif chosen < self.first_chosen - self.displacement:
                self.warn("likelihood_displacement", step, f"the target's log-probability fell from "
                          f"{self.first_chosen:.2f} to {chosen:.2f} (likelihood displacement): raise dpo.sft_weight "
                          "(RPO) or lower the learning rate", first=round(self.first_chosen, 4),
                          last=round(chosen, 4))  # fmt: skip
