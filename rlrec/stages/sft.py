"""SFT stage: teach a causal LM to map a user's history to the next item (TRL `SFTTrainer`, optional PEFT LoRA).

    rlrec sft --config recipes/<dataset>/sft_<variant>.yaml                       (one process)
    accelerate launch --config_file accelerate_configs/<x>.yaml -m rlrec.stages.sft --config <recipe>

Loss on the completion only (the identifier and the stop token; TRL's prompt/completion format). Fine-tuning:
`lora` (rank, alpha, dropout, target modules; the identifier tokens' embedding rows trainable through PEFT's
`trainable_token_indices`, or whole embedding and head through `modules_to_save`) or `full`. `auto` picks full for
a model built from scratch (its weights are random: low-rank updates to random matrices make no sense) and LoRA
for a pretrained one. Checkpoints go to `runs/<name>/sft/checkpoints/` and a rerun resumes from the last one; the
rows TRL tokenised are cached by content hash in `runs/<name>/data/tokenised/` (rlrec.training.sft_cache).
At the end the model (or adapter) is saved to `runs/<name>/sft/model/` and evaluated with the harness
(constrained top-K beam over the full catalogue) on the configured splits: `metrics.json`.
"""

from __future__ import annotations

import sys

import trl
from datasets import Dataset

from rlrec.data.prepared import RunData, last_rows, load_run_data, without_last_rows
from rlrec.decoding.inputs import ModelInputs
from rlrec.errors import ConfigError
from rlrec.evaluate import check_ks
from rlrec.models import BASE_MODEL_DIR, build_for_training
from rlrec.prompts import mix_tasks
from rlrec.recipe import Recipe, stage_inputs
from rlrec.schema import SFTConfig
from rlrec.stages.runner import (
    Timer,
    build_trainer,
    finish,
    policy_report,
    stage_main,
    train_and_save,
)
from rlrec.training.arguments import is_main_process, lora_config, training_arguments, wants_plain_lm_head
from rlrec.training.guard import Guard
from rlrec.training.sft_cache import cache_key, load_cached, save_cached
from rlrec.training.sft_rows import sequence_rows, target_rows
from rlrec.upstream import unfuse_sft_head


def tokenizer_texts(dataset, catalog: list[dict], with_titles: bool, rows_per_split: int = 200) -> list[str]:
    """Texts a from-scratch tokenizer must cover: prompt templates (from a sample of rows), and titles only when a
    task reads or writes them: on Scientific the title words grow a word-level vocabulary from 792 to 11,026
    entries, and the output layer with it (about 8 s per step instead of a fraction of a second)."""
    texts = [c["title"] for c in catalog] if with_titles else []
    for split in dataset.values():
        for row in split.select(range(min(rows_per_split, len(split)))):
            texts.extend(m["content"] for m in row["prompt"] + row["completion"])
    return texts


def run(recipe: Recipe) -> dict | None:
    """Train, save, and (on the main process) evaluate; return the metrics there, None elsewhere."""
    _, data, summary, timer, inputs = train_sft(recipe)
    if not is_main_process():
        return None
    config: SFTConfig = recipe.section("sft")
    return finish(recipe, "sft", data, summary, config.eval_splits, config.eval_max_users, timer, inputs)


def train_sft(recipe: Recipe):
    """Train and save `runs/<name>/sft/model`; return (trainer, run data, summary, timer, the prompt encoding and
    trie: built once here for the rows, the guard and the final evaluation)."""
    config: SFTConfig = recipe.section("sft")
    timer = Timer()
    data = load_run_data(recipe.stage_dir("data"))
    check_ks(recipe.eval.ks, data)  # before training, not after it
    out = recipe.stage_dir("sft")
    alignment = check_rows(config, data)
    texts = tokenizer_texts(data.dataset, data.catalog_rows, with_titles=alignment)
    model, tokenizer, token_ids = build_for_training(config.model, data.identifiers, texts, recipe.seed)
    finetune = config.resolved_finetune()
    peft_config = lora_config(config.lora, model, token_ids, config.identifier_tokens) if finetune == "lora" else None
    if peft_config is not None and config.model.from_scratch and is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out / BASE_MODEL_DIR)  # the adapter's base: random weights nobody else has
    inputs = ModelInputs.build(tokenizer, data.identifiers, data.prompt)
    train_dataset = training_rows(config, data, inputs, recipe.seed)
    if config.max_train_rows is not None and config.max_train_rows < len(train_dataset):
        train_dataset = train_dataset.select(range(config.max_train_rows))  # already shuffled
    targets = sum(train_dataset["targets"]) if "targets" in train_dataset.column_names else len(train_dataset)
    train_dataset = train_dataset.remove_columns([c for c in ("targets", "user") if c in train_dataset.column_names])
    settings = {"max_length": config.max_length, "completion_only_loss": True, "packing": False}
    # SFT alone groups rows by length (train.group_by_length): GRPO samples with its own RepeatSampler, and DPO's
    # preference rows hold prompt_ids, not the input_ids length grouping reads
    sampling = "group_by_length" if config.train.group_by_length else "random"
    key = cache_key(train_dataset, tokenizer, settings)
    cached = load_cached(data.path, key)
    args = trl.SFTConfig(**training_arguments(config.train, out, recipe.seed), **settings,
                         train_sampling_strategy=sampling,
                         dataset_kwargs={"skip_prepare_dataset": cached is not None})  # fmt: skip
    rows = cached if cached is not None else train_dataset
    trainer = build_trainer(
        "sft",
        out,
        lambda: trl.SFTTrainer(
            model=model, args=args, train_dataset=rows, processing_class=tokenizer, peft_config=peft_config
        ),
    )
    if cached is None:
        save_cached(data.path, key, trainer.train_dataset, is_main_process())
    if wants_plain_lm_head(config.train.lm_head, trainer.model):
        unfuse_sft_head(trainer, config.train.label_smoothing)
    guard = None
    if config.select is not None:
        guard = Guard(trainer.model, tokenizer, data, recipe.eval, config.select, out, "sft", inputs)
    details = f"{finetune} fine-tuning, {config.rows} rows: {len(train_dataset):,} rows, {targets:,} targets an epoch"
    keep_best = config.select is not None and config.select.keep_best
    summary, saved_step = train_and_save(trainer, out, "sft", details, config.train.resume,
                                         stage_inputs(recipe, "sft"), guard, keep_best)  # fmt: skip
    train_seconds = timer.seconds
    summary.update(finetune=finetune, rows=config.rows, train_seconds=train_seconds,
                   parameters=sum(p.numel() for p in model.parameters()), identifier_tokens=len(token_ids),
                   train_rows=len(train_dataset), targets_per_epoch=targets, epochs_run=round(trainer.state.epoch, 3),
                   targets_per_second=round(targets * trainer.state.epoch / max(train_seconds, 1e-9), 1),
                   saved_step=saved_step, guard=guard.history if guard is not None else [],
                   warnings=guard.warnings if guard is not None else [])  # fmt: skip
    return trainer, data, summary, timer, inputs


def check_rows(config: SFTConfig, data: RunData) -> bool:
    """Refuse row settings the prepared data cannot give; return whether alignment tasks are on."""
    identifier, prompt_format = data.prompt.identifier, data.prompt.format
    if "train" not in data.dataset:
        raise ConfigError(f"{data.path}: the prepared data has no train split (an export without one, as "
                          "MiniOneRec's: set data.split.train_from: valid and prepare again)")  # fmt: skip
    alignment = bool(config.tasks.title_to_sid or config.tasks.sid_to_title)
    if identifier != "sid" and alignment:
        raise ConfigError(f"sft.tasks title_to_sid / sid_to_title need semantic IDs; this data uses '{identifier}'")
    if prompt_format == "sequence" and (alignment or config.tasks.next_item != 1.0):
        raise ConfigError("sft.tasks: the sequence prompt format trains next items only (tasks: {next_item: 1.0})")
    if config.rows == "sequence" and prompt_format != "sequence":
        raise ConfigError("sft.rows: sequence needs data.prompt.format: sequence (the history must be the text the "
                          "model continues); rerun `rlrec data prepare` with it")  # fmt: skip
    return alignment


def training_rows(config: SFTConfig, data: RunData, inputs: ModelInputs, seed: int) -> Dataset:
    """The training set, shuffled: chat rows (next item plus the alignment tasks), or, in the sequence prompt
    format, tokenised target or sequence rows (rlrec.training.sft_rows)."""
    if data.prompt.format == "chat":
        weights = {"next_item": config.tasks.next_item, "title_to_sid": config.tasks.title_to_sid,
                   "sid_to_title": config.tasks.sid_to_title}  # fmt: skip
        train = without_last_rows(data.rows("train")) if config.hold_out_last else data.rows("train")
        if config.rows_per_user is not None:
            train = train.select(last_rows(train, config.rows_per_user))
        return mix_tasks(train, data.catalog_rows, weights, seed)
    if config.rows == "sequence":
        rows = sequence_rows(data, inputs, config.min_history, config.hold_out_last, config.rows_per_user)
    else:
        rows = target_rows(data, inputs, config.hold_out_last, config.rows_per_user)
    return rows.shuffle(seed=seed)


def report(recipe: Recipe, metrics: dict) -> list[str]:
    """What `rlrec sft` prints."""
    return policy_report(recipe, "sft", metrics)


def main(argv: list[str] | None = None) -> int:
    """Entry point for `accelerate launch -m rlrec.stages.sft --config <recipe> [overrides]`."""
    return stage_main("rlrec.stages.sft", run, argv)


if __name__ == "__main__":
    sys.exit(main())
