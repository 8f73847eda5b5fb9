"""What the post-training stages (GRPO, DPO) share: the model they start from, the training prompts, and the
validation guard.

The starting model is a stage's saved model (`sft`, `dpo`, `grpo`) or any model folder. `finetune: auto` trains
what it holds: its LoRA adapter, or all weights of a full model; `lora` on a full model adds a new adapter (with
the identifier tokens' rows trainable); `full` on an adapter merges it first.

The guard. A naive RL stage made a converged SFT model worse on real data (docs/grpo.md: -34% valid NDCG@10 in 300
steps), and preference optimisation can drift the same way. So a stage evaluates
NDCG@K on a held-out slice of the validation users at step 0 and every `guard.eval_steps`, keeps the best weights,
stops after `guard.patience` evaluations without a gain, and saves the best model: the stage never returns a model
worse on that slice than the one it started from.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from rlrec.data.prepared import RunData
from rlrec.decoding import ItemTrie
from rlrec.errors import RlrecError
from rlrec.evaluate import evaluate_generative
from rlrec.items.index import identifier_codes
from rlrec.models import BASE_MODEL_DIR, load_model
from rlrec.recipe import POLICY_STAGES, Recipe
from rlrec.schema import EvalConfig, GuardConfig, LoraConfig
from rlrec.stages.runner import is_main_process
from rlrec.stages.training import lora_config

# --- the starting model ---------------------------------------------------------------------------------------------


def init_model_dir(recipe: Recipe, init: str, stage: str) -> Path:
    path = recipe.stage_dir(init) / "model" if init in POLICY_STAGES else Path(init)
    if not path.is_dir():
        raise RlrecError(f"{stage}.init: no model at {path}; run the '{init}' stage first or give a model folder")
    return path


@dataclass
class Policy:
    model: object
    tokenizer: object
    init: Path
    adapter_init: bool  # the init folder holds a LoRA adapter
    finetune: str  # lora | full
    peft_config: object | None  # a new adapter for the trainer to add, or None


def load_policy(init: Path, finetune: str, lora: LoraConfig, data: RunData) -> Policy:
    """Load the starting model trainable, as `finetune` asks (see the module docstring)."""
    adapter_init = (init / "adapter_config.json").is_file()
    resolved = finetune if finetune != "auto" else ("lora" if adapter_init else "full")
    model, tokenizer = load_model(init, trainable=True)
    peft_config = None
    if adapter_init and resolved == "full":
        model = model.merge_and_unload()
    elif not adapter_init and resolved == "lora":
        token_ids = tokenizer.convert_tokens_to_ids(identifier_codes(data.identifiers))
        peft_config = lora_config(lora, model, token_ids, "trainable_token_indices")
    return Policy(model, tokenizer, init, adapter_init, resolved, peft_config)


def copy_base_model(policy: Policy, out: Path) -> None:
    """An adapter trained from a from-scratch base needs that base beside it (`<stage>/base_model`)."""
    source = policy.init.parent / BASE_MODEL_DIR
    if policy.adapter_init and policy.finetune == "lora" and source.is_dir() and is_main_process():
        shutil.copytree(source, out / BASE_MODEL_DIR, dirs_exist_ok=True)


# --- training prompts -------------------------------------------------------------------------------------------------


def train_prompts(data: RunData, train_rows: str, max_prompts: int | None, seed: int):
    """The training split's rows (all prefixes, or each user's most recent one), shuffled, optionally capped."""
    rows = data.rows("train")
    if train_rows == "last":
        last = {user: i for i, user in enumerate(rows["user"])}
        rows = rows.select(sorted(last.values()))
    rows = rows.shuffle(seed=seed)
    if max_prompts:
        rows = rows.select(range(min(max_prompts, len(rows))))
    return rows.remove_columns([c for c in rows.column_names if c not in ("prompt", "target", "history", "user")])


# --- the guard ------------------------------------------------------------------------------------------------------


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def make_guard(model, tokenizer, data: RunData, eval_config: EvalConfig, guard: GuardConfig, out: Path,
               label: str = "grpo", trie: ItemTrie | None = None):  # fmt: skip
    """A TrainerCallback: held-out NDCG@K at step 0 and every `eval_steps`; keeps the best trainable weights and
    stops after `patience` evaluations without a gain. Every process evaluates the same rows (no communication,
    identical decisions, and ZeRO-3's sharded forward stays in step). The curve goes to `out/guard.jsonl`. The
    catalogue trie is built once (or passed in by the stage, which has one already), not at every evaluation."""
    rows = data.rows(guard.split, guard.users)
    trie = trie if trie is not None else ItemTrie.build(tokenizer, data.identifiers)
    metric = f"ndcg@{guard.k}"
    config = EvalConfig(ks=[guard.k], beam_width=max(eval_config.beam_width or guard.k, guard.k),
                        batch_size=eval_config.batch_size, exclude_history=eval_config.exclude_history)  # fmt: skip

    class Guard(TrainerCallback):
        def __init__(self) -> None:
            self.history: list[dict] = []
            self.best: tuple[float, int] = (-math.inf, 0)
            self.best_state: dict[str, torch.Tensor] | None = None
            self.stale = 0

        def evaluate(self, step: int, control) -> None:
            training = model.training
            result = evaluate_generative(model, tokenizer, data, config, rows, trie, progress=False)["metrics"]
            if training:
                model.train()
            value = result[metric]
            entry = {"step": step, metric: value, f"hr@{guard.k}": result[f"hr@{guard.k}"], "users": len(rows)}
            self.history.append(entry)
            if value > self.best[0]:
                self.best, self.stale = (value, step), 0
                if guard.keep_best:
                    self.best_state = _trainable_state(model)
            else:
                self.stale += 1
                if guard.patience and self.stale >= guard.patience:
                    control.should_training_stop = True
            if is_main_process():
                print(f"rlrec {label} guard: step {step} {guard.split} {metric} {value:.4f} "
                      f"(best {self.best[0]:.4f} at step {self.best[1]})", flush=True)  # fmt: skip
                with (out / "guard.jsonl").open("a", encoding="utf-8") as log:
                    log.write(json.dumps(entry) + "\n")

        def on_train_begin(self, args, state, control, **kwargs):
            self.evaluate(state.global_step, control)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % guard.eval_steps == 0:
                self.evaluate(state.global_step, control)

        def on_train_end(self, args, state, control, **kwargs):
            if not self.history or self.history[-1]["step"] != state.global_step:
                self.evaluate(state.global_step, control)

        def restore_best(self) -> int:
            """Load the best evaluated weights back; returns the step they come from."""
            if self.best_state is not None:
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        if name in self.best_state:
                            p.copy_(self.best_state[name].to(p.device))
            return self.best[1]

    return Guard()
