"""SFT stage: teach a causal LM to map a user's history to the next item (TRL `SFTTrainer`, optional PEFT LoRA).

    rlrec sft --config recipes/<dataset>/sft_<variant>.yaml                       (one process)
    accelerate launch --config_file accelerate_configs/<x>.yaml -m rlrec.stages.sft --config <recipe>

Loss on the completion only (the identifier and the stop token; TRL's prompt/completion format). Fine-tuning:
`lora` (rank, alpha, dropout, target modules; the identifier tokens' embedding rows trainable through PEFT's
`trainable_token_indices`, or whole embedding and head through `modules_to_save`) or `full`. `auto` picks full for
a model built from scratch (its weights are random: low-rank updates to random matrices make no sense) and LoRA
for a pretrained one. Checkpoints go to `runs/<name>/sft/checkpoints/` and a rerun resumes from the last one.
At the end the model (or adapter) is saved to `runs/<name>/sft/model/` and evaluated with the harness
(constrained top-K beam over the full catalogue) on the configured splits: `metrics.json`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from rlrec.config import dump_config
from rlrec.errors import ConfigError, RlrecError
from rlrec.evaluate import EvalConfig, load_run_data
from rlrec.manifest import write_manifest
from rlrec.models import BASE_MODEL_DIR, ModelConfig, build_for_training, load_model
from rlrec.prompts import mix_tasks
from rlrec.stages.common import (
    LoraSection,
    Timer,
    TrainSection,
    checkpoint_step,
    is_main_process,
    last_checkpoint,
    lora_config,
    stage_main,
    training_arguments,
    unfuse_lm_head,
    unwrap_peft,
    wants_plain_lm_head,
    world_size,
    write_json,
)  # fmt: skip

if TYPE_CHECKING:  # the recipe imports this module's config classes
    from rlrec.recipe import Recipe


@dataclass
class TasksConfig:
    """Passes over each task's rows per epoch (LC-Rec / MiniOneRec multi-task SFT)."""

    next_item: float = 1.0
    title_to_sid: float = 0.0
    sid_to_title: float = 0.0

    def __post_init__(self) -> None:
        if min(self.next_item, self.title_to_sid, self.sid_to_title) < 0:
            raise ConfigError("sft.tasks weights must be >= 0")


@dataclass
class SFTStageConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: Literal["auto", "lora", "full"] = "auto"
    lora: LoraSection = field(default_factory=LoraSection)
    identifier_tokens: Literal["trainable_token_indices", "modules_to_save"] = "trainable_token_indices"
    tasks: TasksConfig = field(default_factory=TasksConfig)
    train: TrainSection = field(default_factory=TrainSection)
    max_length: int = 1024
    eval_splits: list[Literal["valid", "test"]] = field(default_factory=lambda: ["valid", "test"])
    eval_max_users: int | None = None  # evaluate the first N users of each split (None: all)
    max_train_rows: int | None = None  # train on the first N rows of the shuffled mix (quick checks; None: all)

    def resolved_finetune(self) -> str:
        if self.finetune == "auto":
            return "full" if self.model.from_scratch else "lora"
        return self.finetune


def tokenizer_texts(dataset, catalog: list[dict], with_titles: bool, rows_per_split: int = 200) -> list[str]:
    """Texts a from-scratch tokenizer must cover: prompt templates (from a sample of rows), and titles only when a
    task reads or writes them: on Scientific the title words grow a word-level vocabulary from 792 to 11,026
    entries, and the output layer with it (about 8 s per step instead of a fraction of a second)."""
    texts = [c["title"] for c in catalog] if with_titles else []
    for split in dataset.values():
        for row in split.select(range(min(rows_per_split, len(split)))):
            texts.extend(m["content"] for m in row["prompt"] + row["completion"])
    return texts


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run(recipe: Recipe) -> dict | None:
    """Train, save, and (on the main process) evaluate; return the metrics there, None elsewhere."""
    trainer, out, data, summary, timer = train_sft(recipe)
    if not is_main_process():
        return None
    return finish_stage(recipe, out, data, summary, recipe.section("sft"), timer)


def train_sft(recipe: Recipe):
    """Train and save `runs/<name>/sft/model`; return (trainer, stage folder, run data, summary, timer)."""
    from trl import SFTConfig, SFTTrainer

    config: SFTStageConfig = recipe.section("sft")
    timer = Timer()
    data = load_run_data(recipe.stage_dir("data"))
    out = recipe.stage_dir("sft")
    catalog = data.catalog
    identifier = data.stats["identifier"]
    if identifier != "sid" and (config.tasks.title_to_sid or config.tasks.sid_to_title):
        raise ConfigError(f"sft.tasks title_to_sid / sid_to_title need semantic IDs; this data uses '{identifier}'")
    model, tokenizer, token_ids = build_for_training(
        config.model,
        data.identifiers,
        tokenizer_texts(
            data.dataset, catalog, with_titles=bool(config.tasks.title_to_sid or config.tasks.sid_to_title)
        ),
        recipe.seed,
    )
    finetune = config.resolved_finetune()
    peft_config = lora_config(config.lora, model, token_ids, config.identifier_tokens) if finetune == "lora" else None
    if peft_config is not None and config.model.from_scratch and is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out / BASE_MODEL_DIR)  # the adapter's base: random weights nobody else has
    weights = {"next_item": config.tasks.next_item, "title_to_sid": config.tasks.title_to_sid,
               "sid_to_title": config.tasks.sid_to_title}  # fmt: skip
    train_dataset = mix_tasks(data.dataset["train"], catalog, weights, recipe.seed)
    if config.max_train_rows is not None and config.max_train_rows < len(train_dataset):
        train_dataset = train_dataset.select(range(config.max_train_rows))  # already shuffled by mix_tasks
    args = SFTConfig(**training_arguments(config.train, out, recipe.seed), max_length=config.max_length,
                     completion_only_loss=True, packing=False)  # fmt: skip
    try:
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer,
                              peft_config=peft_config)  # fmt: skip
    except ValueError as err:  # PEFT's message when a target module is missing, for example
        raise RlrecError(f"cannot set up SFT: {err}") from None
    if wants_plain_lm_head(config.train.lm_head, trainer.model):
        unfuse_lm_head(unwrap_peft(trainer.model))
    resume = last_checkpoint(out, config.train.resume)
    if is_main_process():
        print(
            f"rlrec sft: world size {world_size()} ({trainer.accelerator.distributed_type.value}), {finetune} "
            f"fine-tuning, {len(train_dataset):,} rows, resume from {resume or 'scratch'}",
            flush=True,
        )
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(out / "model"))
    trainer.accelerator.wait_for_everyone()
    summary = {
        "finetune": finetune, "global_step": trainer.state.global_step, "train_loss": round(result.training_loss, 5),
        "resumed_from": resume, "steps_run": trainer.state.global_step - checkpoint_step(resume),
        "world_size": world_size(), "train_seconds": timer.seconds,
        "distributed_type": trainer.accelerator.distributed_type.value,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": trainable_parameters(trainer.model), "identifier_tokens": len(token_ids),
        "train_rows": len(train_dataset),
    }  # fmt: skip
    if is_main_process():
        with (out / "train_log.jsonl").open("w", encoding="utf-8") as log:
            for row in trainer.state.log_history:
                log.write(json.dumps(row) + "\n")
    return trainer, out, data, summary, timer


def finish_stage(recipe: Recipe, out, data, summary: dict, config, timer: Timer) -> dict:
    """Evaluate the saved model on the configured splits; write metrics.json, config.yaml and manifest.json."""
    from rlrec.stages.evaluate import evaluate_generative

    eval_config = recipe.eval or EvalConfig()
    model, tokenizer = load_model(out / "model")
    metrics = {"protocol": data.protocol, "training": summary}
    for split in config.eval_splits:
        rows = data.rows(split, config.eval_max_users)
        metrics[split] = {**evaluate_generative(model, tokenizer, data, eval_config, rows), "num_users": len(rows)}
    write_json(out / "metrics.json", metrics)
    dump_config(recipe, out / "config.yaml")
    write_manifest(out, [data.path / "dataset"], recipe.seed, timer.seconds, stage=out.name)
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Entry point for `accelerate launch -m rlrec.stages.sft --config <recipe> [overrides]`."""
    return stage_main("rlrec.stages.sft", run, argv)


if __name__ == "__main__":
    sys.exit(main())
