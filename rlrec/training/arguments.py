"""What the training stages (sft, grpo, dpo) share: the optimisation section as TRL arguments, precision, LoRA,
checkpoints, and the choice of LM head.

Precision `auto` means bf16 where a CUDA GPU supports it and fp32 elsewhere; asking for bf16 or fp16 without such a
GPU is an error (TRL's own message on CPU, "Your setup doesn't support bf16/gpu", does not say what to change).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import peft
import torch

from rlrec.errors import ConfigError
from rlrec.models import safetensors_problem
from rlrec.schema import LoraConfig, TrainConfig
from rlrec.upstream import has_token_adapters, unwrap_peft


def resolve_precision(precision: str) -> tuple[bool, bool]:
    """(bf16, fp16) flags for TrainingArguments; errors name the cause."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        return (cuda and torch.cuda.is_bf16_supported()), False
    if precision in ("bf16", "fp16") and not cuda:
        raise ConfigError(f"train.precision '{precision}' needs a CUDA GPU and none is visible; use 'auto' or 'fp32'")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision 'bf16': this GPU does not support bf16; use 'fp16' or 'fp32'")
    return precision == "bf16", precision == "fp16"


def training_arguments(train: TrainConfig, output_dir: Path, seed: int) -> dict:
    """Keyword arguments common to TRL's SFTConfig, DPOConfig and GRPOConfig."""
    bf16, fp16 = resolve_precision(train.precision)
    if train.threads:
        torch.set_num_threads(train.threads)
    return {
        "output_dir": str(output_dir / "checkpoints"),
        "num_train_epochs": train.epochs,
        "max_steps": train.max_steps,
        "per_device_train_batch_size": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "learning_rate": train.learning_rate,
        "lr_scheduler_type": train.scheduler,
        "warmup_steps": train.warmup_ratio,  # transformers 5: a value below 1 is a ratio of the total steps
        "weight_decay": train.weight_decay,
        "label_smoothing_factor": train.label_smoothing,
        "max_grad_norm": train.max_grad_norm,
        "logging_steps": train.logging_steps,
        "save_strategy": "steps",
        "save_steps": train.save_steps,
        "save_total_limit": train.save_total_limit,
        "bf16": bf16,
        "fp16": fp16,
        "use_cpu": not torch.cuda.is_available(),
        "report_to": train.report_to,
        "gradient_checkpointing": train.gradient_checkpointing,
        "seed": seed,
        "data_seed": seed,
        "dataloader_num_workers": 0,
        "ddp_find_unused_parameters": False,
    }


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# Settings a resumed run may change: how long it trains, how it logs and saves, what it evaluates at the end.
RESUMABLE = {"train.epochs", "train.max_steps", "train.logging_steps", "train.save_steps", "train.save_total_limit",
             "train.report_to", "train.resume", "eval_splits", "eval_max_users"}  # fmt: skip
INPUTS_FILE = "inputs.json"  # in <stage>/checkpoints: what the checkpoints there were made from
WEIGHTS = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin")


def last_checkpoint(output_dir: Path, resume: bool, inputs: dict, stage: str) -> str | None:
    """The newest complete checkpoint under `<stage>/checkpoints` made from the same `inputs`, or None.

    Checkpoints made from other inputs (another seed, data, model size or learning rate in the recipe) are never
    resumed silently: with `train.resume` the run stops and names what differs; with `resume: false` they are
    cleared and training starts over. Changing only how long a run trains, logs or saves (RESUMABLE) is fine.
    transformers writes a checkpoint folder piece by piece and `trainer_state.json` last, so a process killed while
    saving leaves a folder that cannot be resumed from; such folders, and folders without weights, are skipped
    (and named) for the one before them rather than crashing the resumed run."""
    folder = output_dir / "checkpoints"
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    if found and not resume and is_main_process():
        print(f"rlrec: {stage}.train.resume is false: removing {len(found)} checkpoint(s) in {folder}", file=sys.stderr)
        shutil.rmtree(folder)
    elif found:
        record = folder / INPUTS_FILE
        before = json.loads(record.read_text()) if record.is_file() else None
        changed = changed_inputs(before, inputs, stage)
        if changed:
            raise ConfigError(f"{folder} holds checkpoints of a run with other inputs ({changed}); delete the folder, "
                              f"or set {stage}.train.resume=false to start over")  # fmt: skip
    if is_main_process():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{INPUTS_FILE}.partial"  # written whole, then renamed: other ranks read it
        partial.write_text(json.dumps(inputs, indent=1, sort_keys=True, default=str) + "\n")
        os.replace(partial, folder / INPUTS_FILE)
    if not resume:
        return None
    for path in sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        if not (path / "trainer_state.json").is_file():
            print(f"rlrec: {path} is incomplete (no trainer_state.json; killed while saving?), not resuming from it",
                  file=sys.stderr)  # fmt: skip
        elif not any((path / name).is_file() for name in WEIGHTS):
            print(f"rlrec: {path} has no weights ({' / '.join(WEIGHTS)}), not resuming from it", file=sys.stderr)
        elif problems := [p for f in path.glob("*.safetensors") if (p := safetensors_problem(f)) is not None]:
            print(f"rlrec: {problems[0]}; not resuming from {path.name}, trying the checkpoint before it",
                  file=sys.stderr)  # fmt: skip
        else:
            return str(path)
    return None


def changed_inputs(before: dict | None, now: dict, stage: str, allowed: set[str] = RESUMABLE) -> str:
    """The settings that differ between two stage inputs, as 'key: old -> new' (the `allowed` ones aside)."""
    if before is None:
        return "no record of the inputs they were made from"
    old, new = _flat(before), _flat(now)
    resumable = {f"sections.{stage}.{key}" for key in allowed}
    keys = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k) and k not in resumable]
    shown = [f"{k.removeprefix('sections.')}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:5]]
    return "; ".join(shown) + (f"; and {len(keys) - 5} more" if len(keys) > 5 else "")


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def checkpoint_step(checkpoint: str | None) -> int:
    """The global step a run resumed from (0 from scratch): `steps_run` in metrics.json is the difference."""
    return int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0


def lora_config(lora: LoraConfig, model, token_ids: list[int], identifier_tokens: str) -> peft.LoraConfig:
    """PEFT's LoraConfig; the identifier tokens' embedding rows (and output rows of an untied head) trainable."""
    extra: dict = {}
    if token_ids:
        names = {module: name for name, module in model.named_modules()}
        embed = names[model.get_input_embeddings()]
        head = model.get_output_embeddings()
        tied = head is None or head.weight is model.get_input_embeddings().weight
        if identifier_tokens == "trainable_token_indices":
            # Tied weights: PEFT ties the head's adapter to the embedding's. Untied: list both modules.
            extra["trainable_token_indices"] = (
                {embed: token_ids} if tied else {embed: token_ids, names[head]: token_ids}
            )
        else:
            extra["modules_to_save"] = [embed] if tied else [embed, names[head]]
            extra["ensure_weight_tying"] = tied  # keep the head tied to the trained embedding copy
    targets = lora.target_modules
    if isinstance(targets, list):
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in present]
        if missing:
            raise ConfigError(f"lora.target_modules {missing} are not modules of this model; "
                              f"linear layers here: {sorted(linear_module_names(model))}")  # fmt: skip
    if lora.top_layers is not None:
        depth = model.config.num_hidden_layers
        if lora.top_layers > depth:
            raise ConfigError(f"lora.top_layers {lora.top_layers}: this model has {depth} decoder layers")
        extra["layers_to_transform"] = list(range(depth - lora.top_layers, depth))
        if targets == "all-linear":  # PEFT takes layers only with named modules; all-linear leaves the head out
            head = model.get_output_embeddings()
            targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                              if isinstance(m, torch.nn.Linear) and m is not head})  # fmt: skip
    return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                           task_type="CAUSAL_LM", **extra)  # fmt: skip


def linear_module_names(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# Below this vocabulary size the plain head is cheaper than TRL's chunked kernel on every device we measured
# (ML-100K SFT on CPU: 1.1 s/step fused, see docs/sft.md); above it the chunked kernel saves activation memory.
PLAIN_HEAD_MAX_VOCAB = 32_768


def wants_plain_lm_head(setting: str, model) -> bool:
    """`train.lm_head`: `plain` / `fused` as asked; `auto` is plain under PEFT token adapters (the fused head cannot
    see them, see `rlrec.upstream.unfuse_lm_head`) and for small vocabularies, fused otherwise."""
    if setting != "auto":
        return setting == "plain"
    vocabulary = unwrap_peft(model).get_output_embeddings().weight.shape[0]
    return has_token_adapters(model) or vocabulary < PLAIN_HEAD_MAX_VOCAB
