"""The validation guard: model selection on held-out users for every training stage (SFT, GRPO, DPO).

A naive RL stage made a converged SFT model worse on real data (docs/grpo.md: -34% valid NDCG@10 in 300 steps),
preference optimisation can drift the same way, and an SFT model can overfit (on Scientific a hidden-64 model got
worse from 12 to 24 epochs). So a stage evaluates NDCG@K on validation users (`GuardConfig`: the whole split or a
seeded random sample) before training when `at_start`, every `eval_steps` steps (or that share of the planned steps,
as transformers reads a fractional eval_steps) or at the end of every epoch (from
`start` of the planned steps on), keeps the best weights, stops after `patience` evaluations without a gain, and
saves the best model: a post-training stage never returns a model worse on those users than the one it started
from, and a longer SFT run never ends worse on them than a shorter one.

Every process evaluates the same users (no communication, identical decisions, and ZeRO-3's sharded forward stays
in step). The curve goes to `<stage>/guard.jsonl`, to the trainer's log (`train_log.jsonl`, TensorBoard) as
`guard/ndcg@K`, and to the stage's `metrics.json` (`training.guard`).

A killed run resumes with its guard: every checkpoint holds the guard's state (`guard_state.json`: the curve, the
best score and step, the count of evaluations without a gain, the warnings; `guard_best.safetensors`: the best
weights), written into the checkpoint folder before transformers writes `trainer_state.json` last, so a checkpoint
that can be resumed from has it. Without it a resumed run would forget step 0 (the start model) and every best
seen before the kill, and could save weights worse on validation than the ones it started from.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from rlrec.data.prepared import RunData
from rlrec.decoding.inputs import ModelInputs
from rlrec.evaluate import evaluate_generative
from rlrec.metrics import ndcg_at_k
from rlrec.schema import EvalConfig, GuardConfig
from rlrec.training.arguments import is_main_process

STATE_FILE = "guard_state.json"
BEST_FILE = "guard_best.safetensors"


class Guard(TrainerCallback):
    """The guard of one stage's training (see the module docstring): `label` names the stage in its messages;
    `inputs` are the run's prompt encoding and trie when the stage has them already (built once, not at every
    evaluation)."""

    def __init__(self, model, tokenizer, data: RunData, eval_config: EvalConfig, config: GuardConfig, out: Path,
                 label: str, inputs: ModelInputs | None = None) -> None:  # fmt: skip
        self.model, self.tokenizer, self.data, self.config, self.out, self.label = (
            model, tokenizer, data, config, out, label)  # fmt: skip
        self.rows = data.sample(config.split, config.users, config.seed)
        self.shadow_rows = data.sample(config.shadow_split, config.users, config.seed) if config.shadow_split else None
        self.inputs = inputs if inputs is not None else ModelInputs.build(tokenizer, data.identifiers, data.prompt)
        width = max(eval_config.beam_width or config.k, config.k)
        self.eval_config = EvalConfig(ks=[config.k], beam_width=width, batch_size=eval_config.batch_size,
                                      exclude_history=eval_config.exclude_history)  # fmt: skip
        self.metric = f"ndcg@{config.k}"
        self.history: list[dict] = []
        self.best: tuple[float, int] = (-math.inf, 0)
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stale = 0
        self.warnings: list[dict] = []
        self.trainer = None
        self.every: int | None = None  # steps between periodic evaluations, known when training begins
        self.started = (time.time(), time.process_time())  # reset when training begins: time into training
        self.eval_cpu_seconds = 0.0  # spent evaluating, so that the stage's training rate leaves it out
        out.mkdir(parents=True, exist_ok=True)
        if is_main_process():  # a new guard, a new curve (a resumed one rewrites it from its checkpoint's state)
            (out / "guard.jsonl").unlink(missing_ok=True)

    def attach(self, trainer) -> Guard:
        """Add the guard to `trainer`; its evaluations then also go to the trainer's log."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def evaluate(self, step: int, control) -> None:
        model, training = self.model, self.model.training
        cpu_started = time.process_time()
        evaluated = evaluate_generative(model, self.tokenizer, self.data, self.eval_config, self.rows, self.inputs,
                                        progress=False)  # fmt: skip
        result = evaluated["metrics"]
        shadow = None
        if self.shadow_rows is not None:  # recorded beside the curve, never compared, so never chosen on
            shadow = evaluate_generative(model, self.tokenizer, self.data, self.eval_config, self.shadow_rows,
                                         self.inputs, progress=False)["metrics"][self.metric]  # fmt: skip
        self.eval_cpu_seconds += time.process_time() - cpu_started
        if training:
            model.train()
        value, hr = result[self.metric], result[f"hr@{self.config.k}"]
        # the standard error of the sample's mean NDCG: how far apart two evaluations must be to mean anything
        per_user = [ndcg_at_k(rank, self.config.k) for rank in evaluated["ranks"]]
        error = statistics.stdev(per_user) / math.sqrt(len(per_user)) if len(per_user) > 1 else 0.0
        entry = {"step": step, self.metric: value, f"hr@{self.config.k}": hr, "users": len(self.rows),
                 "standard_error": round(error, 5),
                 "seconds": round(time.time() - self.started[0], 1),
                 "cpu_seconds": round(time.process_time() - self.started[1], 1)}  # fmt: skip
        if shadow is not None:
            entry[f"{self.config.shadow_split}_{self.metric}"] = shadow
        self.history.append(entry)
        if self.config.smooth > 1:  # the trailing mean of the last `smooth` evaluations is what is compared
            window = [e[self.metric] for e in self.history[-self.config.smooth :]]
            value = entry["smoothed"] = sum(window) / len(window)
        if value > self.best[0]:
            self.best, self.stale = (value, step), 0
            if self.config.keep_best:
                self.best_state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        else:
            self.stale += 1
            if self.config.patience and self.stale >= self.config.patience:
                control.should_training_stop = True
                self._warn(step, value)
        logged = {f"guard/{self.metric}": entry[self.metric], f"guard/hr@{self.config.k}": hr}
        smoothed = ""
        if "smoothed" in entry:
            logged[f"guard/smoothed_{self.metric}"] = value
            smoothed = f", mean of the last {self.config.smooth} {value:.4f}"
        self._log(step, logged, control)
        if is_main_process():
            print(f"rlrec {self.label} guard: step {step} {self.config.split} {self.metric} {entry[self.metric]:.4f}"
                  f" ± {error:.4f} SE{smoothed} (best {self.best[0]:.4f} at step {self.best[1]}, "
                  f"{len(self.rows)} users)",
                  flush=True)  # fmt: skip
            with (self.out / "guard.jsonl").open("a", encoding="utf-8") as log:
                log.write(json.dumps(entry) + "\n")

    def _warn(self, step: int, value: float) -> None:
        best, best_step = self.best
        message = (f"validation {self.metric} did not beat {best:.4f} (step {best_step}) for {self.stale} evaluations "
                   f"(last {value:.4f}); training stops and keeps step {best_step}")  # fmt: skip
        self.warnings.append({"kind": "validation_fell", "step": step, "message": message, "best": best,
                              "best_step": best_step, "last": value})  # fmt: skip
        if is_main_process():
            print(f"rlrec {self.label} warning (step {step}): {message}", file=sys.stderr, flush=True)

    def _log(self, step: int, values: dict, control) -> None:
        """Into the trainer's log history (train_log.jsonl) and its log callbacks (TensorBoard, W&B, console)."""
        trainer = self.trainer
        if trainer is None:
            return
        trainer.state.log_history.append({**values, "step": step})
        trainer.callback_handler.on_log(trainer.args, trainer.state, control, values)

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = (time.time(), time.process_time())
        self.every = evaluation_interval(self.config.eval_steps, state.max_steps)
        if state.global_step > 0:  # resumed from a checkpoint
            self._load_state(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)
        elif self.config.at_start:
            self.evaluate(state.global_step, control)

    def due(self, state) -> bool:
        """Past `start` of the planned steps (periodic evaluations only; at_start and the last step always count)."""
        return state.global_step >= self.config.start * state.max_steps

    def on_step_end(self, args, state, control, **kwargs):
        if self.every is not None and state.global_step % self.every == 0 and self.due(state):
            self.evaluate(state.global_step, control)
        if control.should_save:  # transformers saves this step's checkpoint next: the guard's state goes in first
            self._save_state(args, state)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.config.eval_steps == "epoch" and self.due(state):
            self.evaluate(state.global_step, control)
            if (Path(args.output_dir) / f"checkpoint-{state.global_step}").is_dir():  # saved at the epoch's last step
                self._save_state(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        if not self.history or self.history[-1]["step"] != state.global_step:
            self.evaluate(state.global_step, control)
        self._warn_if_no_gain(state.global_step)

    def _warn_if_no_gain(self, step: int) -> None:
        """A stage that did not beat where it started on validation says so (console and metrics.json): the weights
        it keeps are the start model's, or (keeping the last ones) they are worse than the start."""
        if len(self.history) < 2 or self.history[0]["step"] != 0:  # no step-0 evaluation: nothing to compare with
            return
        start, last = self.history[0][self.metric], self.history[-1][self.metric]
        if self.config.keep_best and self.best[1] == 0:
            kind = "kept_start"
            message = (f"no evaluation beat the start model's validation {self.metric} {start:.4f}: the saved "
                       "weights are step 0's, unchanged by training")  # fmt: skip
        elif not self.config.keep_best and last < start:  # the saved weights are the last ones
            kind = "ended_below_start"
            message = f"validation {self.metric} ended at {last:.4f}, below the start model's {start:.4f}"
        else:
            return
        if any(w["kind"] == kind for w in self.warnings):  # once, also across a resume
            return
        self.warnings.append({"kind": kind, "step": step, "message": message, "start": start, "last": last})
        if is_main_process():
            print(f"rlrec {self.label} warning: {message}", file=sys.stderr, flush=True)

    def _save_state(self, args, state) -> None:
        if not is_main_process():
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        if self.best_state is not None:
            save_file(self.best_state, str(folder / BEST_FILE))
        payload = {"history": self.history, "best": list(self.best), "stale": self.stale, "warnings": self.warnings,
                   "has_best_state": self.best_state is not None}  # fmt: skip
        partial = folder / f".{STATE_FILE}.partial"  # whole or absent, never half written
        partial.write_text(json.dumps(payload), encoding="utf-8")
        partial.replace(folder / STATE_FILE)

    def _load_state(self, folder: Path, step: int) -> None:
        """Continue the guard of the run that wrote `folder`; the curve file is rewritten to match it."""
        path = folder / STATE_FILE
        if not path.is_file():
            message = (f"{folder} has no guard state (made before rlrec saved it): the guard restarts at step {step} "
                       "and the evaluations before it, the start model's included, are not candidates")  # fmt: skip
            self.warnings.append({"kind": "guard_state_missing", "step": step, "message": message})
            if is_main_process():
                print(f"rlrec {self.label} warning (step {step}): {message}", file=sys.stderr, flush=True)
            return
        saved = json.loads(path.read_text(encoding="utf-8"))
        self.history, self.stale, self.warnings = saved["history"], saved["stale"], saved["warnings"]
        self.best = (saved["best"][0], saved["best"][1])
        if saved["has_best_state"]:
            self.best_state = load_file(str(folder / BEST_FILE))
        if is_main_process():
            with (self.out / "guard.jsonl").open("w", encoding="utf-8") as log:
                log.writelines(json.dumps(entry) + "\n" for entry in self.history)
            print(f"rlrec {self.label} guard: resumed at step {step} with {len(self.history)} evaluations (best "
                  f"{self.best[0]:.4f} at step {self.best[1]})", flush=True)  # fmt: skip

    def restore_best(self) -> int:
        """Load the best evaluated weights back; returns the step they come from."""
        if self.best_state is not None:
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    if name in self.best_state:
                        p.copy_(self.best_state[name].to(p.device))
        return self.best[1]


def evaluation_interval(eval_steps: int | float | str, max_steps: int) -> int | None:
    """Steps between periodic evaluations: `eval_steps` itself, or a share of the planned `max_steps` rounded up
    (transformers' rule for a fractional eval_steps); None when the guard evaluates at the end of each epoch."""
    if eval_steps == "epoch":
        return None
    if isinstance(eval_steps, float):
        return max(1, math.ceil(round(eval_steps * max_steps, 6)))  # 0.08 x 125 is 10, not 10.000000000000002
    return int(eval_steps)
