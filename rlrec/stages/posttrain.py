"""What the post-training stages (GRPO, DPO) share: the model they start from and the training prompts (the
validation guard they share with SFT is `rlrec.training.guard`).

The starting model is a stage's saved model (`sft`, `dpo`, `grpo`) or any model folder. `finetune: auto` trains
what it holds: its LoRA adapter, or all weights of a full model; `lora` on a full model adds a new adapter (with
the identifier tokens' rows trainable); `full` on an adapter merges it first.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from rlrec.data.prepared import RunData, last_rows
from rlrec.errors import RlrecError
from rlrec.items.index import identifier_codes
from rlrec.models import BASE_MODEL_DIR, load_model
from rlrec.recipe import POLICY_STAGES, Recipe
from rlrec.schema import LoraConfig
from rlrec.training.arguments import is_main_process, lora_config

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
        rows = rows.select(last_rows(rows))
    rows = rows.shuffle(seed=seed)
    if max_prompts:
        rows = rows.select(range(min(max_prompts, len(rows))))
    return rows.remove_columns([c for c in rows.column_names if c not in ("prompt", "target", "history", "user")])
