"""What every training stage shares: the optimisation section of a recipe, LoRA, precision, checkpoints, saving,
the end-of-stage evaluation, and a clean exit under `accelerate launch`.

Precision `auto` means bf16 where a CUDA GPU supports it and fp32 elsewhere; asking for bf16 or fp16 without such a
GPU is an error (TRL's own message on CPU, "Your setup doesn't support bf16/gpu", does not say what to change).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from rlrec.errors import ConfigError, RlrecError

Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]


@dataclass
class LoraSection:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1 or not 0 <= self.dropout < 1:
            raise ConfigError("lora: r >= 1, alpha >= 1 and 0 <= dropout < 1 are required")


@dataclass
class TrainSection:
    """Optimisation settings, mapped onto transformers/TRL TrainingArguments."""

    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    learning_rate: float = 2e-4
    batch_size: int = 16  # per device
    grad_accum: int = 1
    warmup_ratio: float = 0.0  # share of the total steps, < 1
    scheduler: Scheduler = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 2
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    gradient_checkpointing: bool = False
    # Batch rows of similar length (transformers' LengthGroupedSampler): histories vary from 1 to max_history items,
    # and a random batch pads every row to its longest one; grouping cut the padded tokens and the step time.
    group_by_length: bool = True
    # How the trainers score tokens: TRL's chunked fused kernel, a plain output layer on the labelled positions,
    # or auto (plain for small vocabularies and under token adapters; see unfuse_lm_head)
    lm_head: Literal["auto", "fused", "plain"] = "auto"
    resume: bool = True  # continue from the stage's last checkpoint if there is one
    threads: int | None = None  # torch CPU threads per process

    def __post_init__(self) -> None:
        if self.learning_rate <= 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train: learning_rate > 0, batch_size >= 1 and grad_accum >= 1 are required")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("train.warmup_ratio must be in [0, 1)")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("train: set epochs > 0 or max_steps > 0")


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


def training_arguments(train: TrainSection, output_dir: Path, seed: int) -> dict:
    """Keyword arguments common to SFTConfig, DPOConfig and GRPOConfig."""
    bf16, fp16 = resolve_precision(train.precision)
    if train.threads:
        torch.set_num_threads(train.threads)
    # TensorBoard logs of a stage live in its folder (transformers 5 reads the location from the environment).
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(output_dir / "logs"))
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
        "train_sampling_strategy": "group_by_length" if train.group_by_length else "random",
        "ddp_find_unused_parameters": False,
    }


def last_checkpoint(output_dir: Path, resume: bool) -> str | None:
    """The newest complete checkpoint under `<stage>/checkpoints`, or None.

    transformers writes a checkpoint folder piece by piece and `trainer_state.json` last, so a process killed while
    saving leaves a folder that cannot be resumed from; such folders are skipped (and named) rather than crashing
    the resumed run."""
    folder = output_dir / "checkpoints"
    if not resume or not folder.is_dir():
        return None
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    for path in sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        if (path / "trainer_state.json").is_file():
            return str(path)
        print(f"rlrec: {path} is incomplete (no trainer_state.json; killed while saving?), not resuming from it",
              file=sys.stderr)  # fmt: skip
    return None


def checkpoint_step(checkpoint: str | None) -> int:
    """The global step a run resumed from (0 from scratch): `steps_run` in metrics.json is the difference."""
    return int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0


def lora_config(lora: LoraSection, model, token_ids: list[int], identifier_tokens: str):
    """PEFT LoraConfig; the identifier tokens' embedding rows (and output rows of an untied head) trainable."""
    from peft import LoraConfig

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
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                      task_type="CAUSAL_LM", **extra)  # fmt: skip


def linear_module_names(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def finish_distributed() -> None:
    """End a multi-process run cleanly. About 1 in 10 two-process runs aborted at interpreter shutdown after
    finishing ("terminate called without an active exception", exit 1; ../shared/notes/toolchain.md); leaving with
    os._exit(0) once everything is flushed and saved gave 0 failures in 24 runs."""
    if world_size() <= 1:
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def stage_main(prog: str, run, argv: list[str] | None) -> int:
    """`accelerate launch -m <prog> --config <recipe> [overrides]`: run the stage, print an RlrecError as one line
    (exit 2), and leave the process group cleanly (see finish_distributed)."""
    import argparse

    from rlrec.config import load_config
    from rlrec.recipe import Recipe  # the recipe imports the stage modules, which import this one

    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--config", required=True)
    args, overrides = parser.parse_known_args(argv)
    try:
        run(load_config(Recipe, args.config, overrides))
    except RlrecError as err:
        print(f"rlrec: error: {err}", file=sys.stderr)
        return 2
    finish_distributed()
    return 0


class Timer:
    def __init__(self) -> None:
        self.start = time.time()

    @property
    def seconds(self) -> float:
        return round(time.time() - self.start, 1)


def unwrap_peft(model):
    """The transformers model under a PEFT wrapper (the object TRL's `add_fused_lm_head` patches), or the model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def has_token_adapters(model) -> bool:
    """Whether PEFT wraps the output layer (trainable_token_indices or modules_to_save on the LM head/embeddings)."""
    from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

    head = unwrap_peft(model).get_output_embeddings()
    return isinstance(head, (TrainableTokensWrapper, ModulesToSaveWrapper))


# Below this vocabulary size the plain head is cheaper than TRL's chunked kernel on every device we measured
# (ML-100K SFT on CPU: 1.1 s/step fused, see docs/sft.md); above it the chunked kernel saves activation memory.
PLAIN_HEAD_MAX_VOCAB = 32_768


def wants_plain_lm_head(setting: str, model) -> bool:
    """`train.lm_head`: `plain` / `fused` as asked; `auto` is plain under PEFT token adapters (the fused head cannot
    see them, see `unfuse_lm_head`) and for small vocabularies, fused otherwise."""
    if setting != "auto":
        return setting == "plain"
    vocabulary = unwrap_peft(model).get_output_embeddings().weight.shape[0]
    return has_token_adapters(model) or vocabulary < PLAIN_HEAD_MAX_VOCAB


def unfuse_lm_head(model, temperature: float = 1.0) -> None:
    """Replace TRL's fused LM head (`add_fused_lm_head`) on `model` by a plain one with the same outputs.

    TRL 1.16's fused head reads `get_output_embeddings().weight` and `.bias` directly. Under PEFT's token adapters
    that module is a wrapper: with `trainable_token_indices` it has no `bias` (AttributeError), and its `.weight` is
    the frozen original either way, so the trained identifier rows would never reach the log-probabilities. The
    plain forward runs the decoder, then the output layer (through any wrapper) only on the labelled positions:
    with completion-only losses that is a few tokens per row, so it is also much cheaper than the chunked kernel
    for small vocabularies. The model keeps the `fused_lm_head=True` call signature the trainers use."""
    import functools
    import types

    import torch.nn.functional as F
    from trl.trainer.utils import FusedCausalLMOutput

    original = type(model).forward
    softcap = getattr(model.config, "final_logit_softcapping", None)

    @functools.wraps(original)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return original(self, *args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        kwargs["use_cache"] = False
        kwargs.pop("logits_to_keep", None)  # the labels say which positions are scored
        hidden = self.get_decoder()(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100
        target = labels[mask]
        logits = self.get_output_embeddings()(hidden[mask]).float()
        if softcap:  # Gemma-style final soft-capping, as the model's own forward applies it
            logits = torch.tanh(logits / softcap) * softcap
        logprobs = F.log_softmax(logits / temperature, dim=-1)

        def scatter(values):
            full = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
            full[mask] = values
            return full

        per_token = scatter(logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1))
        entropy = scatter(-(logprobs.exp() * logprobs).sum(-1))
        is_top1 = scatter(logits.argmax(-1) == target)
        mean_logits = scatter((logits / temperature).mean(-1).detach())  # DPO logs it
        loss = -per_token.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=per_token, entropy=entropy, is_top1=is_top1,
                                   mean_logits=mean_logits, label_mask=mask)  # fmt: skip

    model.forward = types.MethodType(forward, model)
