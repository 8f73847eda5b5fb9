"""Preference stage: DPO and multi-negative S-DPO from the SFT model, with mined negatives.

    rlrec dpo --config recipes/<dataset>/dpo_<variant>.yaml                        (one process)
    accelerate launch --config_file accelerate_configs/<x>.yaml -m rlrec.stages.dpo --config <recipe>

Preference data. Each training prompt's target is "chosen"; the "rejected" items come from configured sources, in
this order: `hard` (the current model's constrained top beam, the items it would recommend instead of the target),
`history` (the user's own earlier items, most recent first), `popular` (drawn in proportion to training
popularity) and `random` (uniform over the catalogue). Sampled sources skip the user's history (known positives).
The target, items outside the catalogue and repeats are filtered and counted; a prompt with fewer negatives than
asked is filled with random items, dropped, or an error (`negatives.on_shortfall`), and counted. The counts are in
`metrics.json` (`training.rounds[i].negatives`).

Losses. `loss: dpo` is TRL's `DPOTrainer` unchanged (any of its `dpo_loss_type`s): each negative makes one
(prompt, chosen, rejected) pair. `loss: sdpo` scores all K negatives of a prompt in one softmax
(`rlrec.stages.sdpo`). Completions are the items' token sequences from the catalogue trie.

Iterative mode (`rounds` > 1, OneRec's iterative preference alignment without its reward model): each round mines
hard negatives with the model the previous round produced, trains against that model as the reference, and saves
`round-<r>/model`. A rerun skips finished rounds and resumes an unfinished one from its last checkpoint.
`dpo/train_log.jsonl` holds every round's TRL log (rewards/chosen, rewards/margins, ...) with its round number.

Every round is eval-gated like GRPO (`rlrec.stages.posttrain`): it keeps the best weights on a validation slice,
the round's starting model included. The final model is `dpo/model`, evaluated on `eval_splits` in `metrics.json`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from rlrec.errors import ConfigError, RlrecError
from rlrec.evaluate import EvalConfig, RunData, load_run_data
from rlrec.models import BASE_MODEL_DIR
from rlrec.stages.common import (
    LoraSection,
    Timer,
    TrainSection,
    checkpoint_step,
    is_main_process,
    last_checkpoint,
    stage_main,
    training_arguments,
    unfuse_lm_head,
    unwrap_peft,
    wants_plain_lm_head,
    world_size,
    write_json,
)  # fmt: skip
from rlrec.stages.posttrain import GuardConfig, copy_base_model, init_model_dir, load_policy, make_guard, train_prompts

if TYPE_CHECKING:
    from rlrec.recipe import Recipe


@dataclass
class NegativesConfig:
    """Rejected items per prompt, by source (see the module docstring)."""

    hard: int = 3
    history: int = 0
    popular: int = 0
    random: int = 0
    on_shortfall: Literal["fill_random", "drop", "error"] = "fill_random"
    beam_batch_size: int = 32  # prompts per beam search when mining hard negatives

    def __post_init__(self) -> None:
        if min(self.hard, self.history, self.popular, self.random) < 0:
            raise ConfigError("dpo.negatives: counts must be >= 0")
        if self.total < 1:
            raise ConfigError("dpo.negatives: ask for at least one negative (hard, history, popular or random)")
        if self.beam_batch_size < 1:
            raise ConfigError("dpo.negatives.beam_batch_size must be >= 1")

    @property
    def total(self) -> int:
        return self.hard + self.history + self.popular + self.random


@dataclass
class DPOStageConfig:
    init: str = "sft"  # stage of this run whose model to start from (sft, grpo), or a model folder
    finetune: Literal["auto", "lora", "full"] = "auto"  # auto: train what init holds (its adapter, or all weights)
    lora: LoraSection = field(default_factory=LoraSection)  # used when a full init gets a new adapter
    loss: Literal["dpo", "sdpo"] = "sdpo"
    dpo_loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])  # TRL's loss types, for loss: dpo
    beta: float = 0.1
    # weight of the target's negative log-likelihood (mean per token) added to the preference loss: RPO (Pang et
    # al. 2024, "Iterative Reasoning Preference Optimization"), TRL's `sft` loss type. Keeps the target's own
    # probability from falling with its negatives' (likelihood displacement), which costs ranking quality.
    sft_weight: float = 0.0
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    rounds: int = 1  # > 1: iterative, hard negatives re-mined from each round's model
    train_rows: Literal["all", "last"] = "last"  # all training prefixes, or each user's most recent one
    max_train_prompts: int | None = None
    train: TrainSection = field(default_factory=lambda: TrainSection(learning_rate=1e-5, logging_steps=5))
    guard: GuardConfig = field(default_factory=GuardConfig)
    eval_splits: list[Literal["valid", "test"]] = field(default_factory=lambda: ["test"])
    eval_max_users: int | None = None

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError("dpo.beta must be > 0")
        if self.sft_weight < 0:
            raise ConfigError("dpo.sft_weight must be >= 0")
        if "sft" in self.dpo_loss_type:
            raise ConfigError("dpo.dpo_loss_type: use dpo.sft_weight for the SFT term")
        if self.rounds < 1:
            raise ConfigError("dpo.rounds must be >= 1")
        if not self.dpo_loss_type:
            raise ConfigError("dpo.dpo_loss_type: name at least one of TRL's DPO loss types")
        if self.loss == "sdpo" and self.dpo_loss_type != ["sigmoid"]:
            raise ConfigError("dpo.dpo_loss_type applies to loss: dpo; S-DPO has its own loss")


# --- preference data ----------------------------------------------------------------------------------------------


def mine_hard_negatives(model, tokenizer, trie, rows, count: int, exclude_history: bool, batch_size: int):
    """The model's constrained top `count + 1` items per prompt (one more than asked: the target may be among them
    and is filtered later). Under an `exclude_history` protocol the history is banned, as at evaluation."""
    from rlrec.decoding.beam import recommend

    exclude = rows["history"] if exclude_history else None
    results = recommend(model, tokenizer, rows["prompt"], count + 1, trie, batch_size=batch_size, exclude=exclude)
    return [[item for item, _ in ranked] for ranked in results]


def _take(candidates, want: int, target: str, history: list[str], chosen: list[str], catalogue: set[str],
          report: dict, sampled: bool) -> None:  # fmt: skip
    """Append up to `want` valid negatives from `candidates` to `chosen`, counting what is filtered."""
    taken = 0
    for item in candidates:
        if taken == want:
            return
        if item == target:
            report["target_removed"] += 1
        elif item not in catalogue:
            report["unknown_removed"] += 1
        elif item in chosen:
            report["repeats_removed"] += 0 if sampled else 1  # a sampled source has spares
        elif sampled and item in history:
            continue  # a known positive of this user: draw again
        else:
            chosen.append(item)
            taken += 1


def build_preferences(rows, item_ids: list[str], popularity, negatives: NegativesConfig,
                      hard: list[list[str]] | None, seed: int) -> tuple[list[dict], dict]:  # fmt: skip
    """(prompt, chosen target, K rejected items) per row, and the counts of what was filtered, filled or dropped."""
    rng = np.random.default_rng(seed)
    catalogue = set(item_ids)
    weights = np.array([popularity.get(item, 0) + 1 for item in item_ids], dtype=float)  # add-one: none impossible
    weights /= weights.sum()
    report = {"prompts": 0, "negatives_per_prompt": negatives.total, "target_removed": 0, "unknown_removed": 0,
              "repeats_removed": 0, "short_prompts": 0, "filled_random": 0, "dropped_prompts": 0}  # fmt: skip
    records: list[dict] = []
    for i in range(len(rows["prompt"])):
        target, history = rows["target"][i], list(rows["history"][i])
        chosen: list[str] = []
        # Sampled sources draw distinct items, enough that the target, the history and the negatives already
        # taken cannot exhaust them; only a catalogue smaller than that comes up short.
        size = min(len(item_ids), 2 * negatives.total + len(history) + 1)

        def draw(p=None, size=size):
            return [item_ids[j] for j in rng.choice(len(item_ids), size=size, replace=False, p=p)]

        sources = [
            (hard[i] if hard is not None else [], negatives.hard, False),
            (reversed(history), negatives.history, False),
            (draw(weights) if negatives.popular else [], negatives.popular, True),
            (draw() if negatives.random else [], negatives.random, True),
        ]
        for candidates, want, sampled in sources:
            _take(candidates, want, target, history, chosen, catalogue, report, sampled)
        missing = negatives.total - len(chosen)
        if missing:
            report["short_prompts"] += 1
            if negatives.on_shortfall == "error":
                raise RlrecError(f"user {rows['user'][i]}: found {len(chosen)} of {negatives.total} negatives "
                                 f"(target {target}, history of {len(history)}); lower dpo.negatives or set "
                                 "dpo.negatives.on_shortfall: fill_random / drop")  # fmt: skip
            if negatives.on_shortfall == "drop":
                report["dropped_prompts"] += 1
                continue
            _take(draw(), missing, target, history, chosen, catalogue, report, True)
            report["filled_random"] += missing - (negatives.total - len(chosen))
            if len(chosen) < negatives.total:
                raise RlrecError(f"the catalogue has too few items for {negatives.total} negatives per prompt")
        records.append({"prompt": rows["prompt"][i], "chosen": target, "rejected": chosen})
        report["prompts"] += 1
    return records, report


def tokenize_preferences(records: list[dict], tokenizer, trie, pairwise: bool):
    """Token ids from the catalogue trie: pairwise rows (one per negative) for DPO, one row per prompt for S-DPO."""
    from datasets import Dataset

    from rlrec.decoding.beam import encode_prompts

    position = {item: i for i, item in enumerate(trie.item_ids)}
    prompt_ids = encode_prompts(tokenizer, [r["prompt"] for r in records])
    columns: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for ids, record in zip(prompt_ids, records, strict=True):
        chosen = trie.sequences[position[record["chosen"]]]
        rejected = [trie.sequences[position[item]] for item in record["rejected"]]
        for negative in rejected if pairwise else [rejected]:
            columns["prompt_ids"].append(ids)
            columns["chosen_ids"].append(chosen)
            columns["rejected_ids"].append(negative)
    return Dataset.from_dict(columns)


def copy_reference_tokens(model) -> int:
    """Make TRL's "ref" adapter an exact copy of the adapter being trained; returns the parameters copied.

    TRL 1.16 builds the reference of a PEFT model that already holds an adapter by adding a "ref" adapter and
    copying the parameters whose names contain `.default.`. PEFT's trainable-token rows (the identifier tokens) are
    named `...trainable_tokens_delta.default`, with no dot after it, so they stayed at their initial values: the
    reference of a second round was not the model it starts from (caught by test_dpo's step-0 reward check)."""
    if "ref" not in getattr(model, "peft_config", {}):
        return 0
    params = dict(model.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, param in params.items():
            ref = name[: -len(".default")] + ".ref" if name.endswith(".default") else None
            if ref in params:
                params[ref].copy_(param)
                copied += 1
    return copied


# --- one round ------------------------------------------------------------------------------------------------------


def train_round(recipe: Recipe, config: DPOStageConfig, data: RunData, init: Path, finetune: str, out: Path,
                round_index: int) -> dict:  # fmt: skip
    """Mine negatives with the model in `init`, train one preference round against it, save `out/model`."""
    from trl import DPOConfig

    from rlrec.decoding import ItemTrie
    from rlrec.stages.sdpo import MultiNegativeCollator, PreferenceTrainer
    from rlrec.stages.sft import trainable_parameters

    timer = Timer()
    eval_config = recipe.eval or EvalConfig()
    policy = load_policy(init, finetune, config.lora, data)
    model, tokenizer = policy.model, policy.tokenizer
    trie = ItemTrie.build(tokenizer, data.identifiers)
    seed = recipe.seed + round_index - 1
    rows = train_prompts(data, config.train_rows, config.max_train_prompts, seed)[:]
    hard = None
    if config.negatives.hard:
        if torch.cuda.is_available():
            model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")  # mine on this process's GPU
        hard = mine_hard_negatives(model, tokenizer, trie, rows, config.negatives.hard, eval_config.exclude_history,
                                   config.negatives.beam_batch_size)  # fmt: skip
    mined_seconds = timer.seconds
    records, report = build_preferences(rows, data.item_ids, data.popularity, config.negatives, hard, seed)
    if not records:
        raise RlrecError(f"dpo round {round_index}: no preference rows left ({report})")
    sdpo = config.loss == "sdpo"
    dataset = tokenize_preferences(records, tokenizer, trie, pairwise=not sdpo)
    kwargs = training_arguments(config.train, out, recipe.seed)
    kwargs.pop("train_sampling_strategy")  # length grouping reads input_ids; preference rows hold prompt_ids
    loss_types, loss_weights = list(config.dpo_loss_type), [1.0] * len(config.dpo_loss_type)
    if config.sft_weight and not sdpo:  # pairwise: TRL's own `sft` term; S-DPO adds it in PreferenceTrainer
        loss_types, loss_weights = [*loss_types, "sft"], [*loss_weights, config.sft_weight]
    args = DPOConfig(**kwargs, beta=config.beta, loss_type=loss_types, loss_weights=loss_weights, max_length=None,
                     precompute_ref_log_probs=False)  # fmt: skip
    # A full model trains against a frozen copy of itself as loaded; an adapter against TRL's "ref" adapter copy.
    ref_model = None
    if policy.finetune == "full":
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else trie.stop_token
    out.mkdir(parents=True, exist_ok=True)
    (out / "guard.jsonl").unlink(missing_ok=True)
    try:
        trainer = PreferenceTrainer(
            model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer,
            peft_config=policy.peft_config, data_collator=MultiNegativeCollator(pad_id) if sdpo else None,
            num_negatives=config.negatives.total if sdpo else None, sft_weight=config.sft_weight,
        )  # fmt: skip
    except ValueError as err:
        raise RlrecError(f"cannot set up DPO: {err}") from None
    copy_reference_tokens(trainer.accelerator.unwrap_model(trainer.model))
    if wants_plain_lm_head(config.train.lm_head, trainer.model):
        unfuse_lm_head(unwrap_peft(trainer.model))
        if trainer.ref_model is not None:
            unfuse_lm_head(trainer.accelerator.unwrap_model(trainer.ref_model))
    guard = make_guard(trainer.model, tokenizer, data, eval_config, config.guard, out, label="dpo")
    trainer.add_callback(guard)
    resume = last_checkpoint(out, config.train.resume)
    if is_main_process():
        print(f"rlrec dpo round {round_index}/{config.rounds}: world size {world_size()} "
              f"({trainer.accelerator.distributed_type.value}), {config.loss} ({policy.finetune}) from {init}, "
              f"{report['prompts']:,} prompts x {config.negatives.total} negatives ({len(dataset):,} rows), "
              f"negatives: {report}, resume from {resume or 'scratch'}", flush=True)  # fmt: skip
    result = trainer.train(resume_from_checkpoint=resume)
    saved_step = guard.restore_best() if config.guard.keep_best else trainer.state.global_step
    trainer.save_model(str(out / "model"))
    copy_base_model(policy, out)
    summary = {
        "round": round_index, "init": str(init), "finetune": policy.finetune, "negatives": report,
        "rows": len(dataset), "global_step": trainer.state.global_step, "saved_step": saved_step,
        "train_loss": round(result.training_loss, 5), "resumed_from": resume,
        "steps_run": trainer.state.global_step - checkpoint_step(resume), "mining_seconds": mined_seconds,
        "seconds": timer.seconds, "trainable_parameters": trainable_parameters(trainer.model),
        "guard": guard.history,
    }  # fmt: skip
    if is_main_process():
        with (out / "train_log.jsonl").open("w", encoding="utf-8") as log:
            for row in trainer.state.log_history:
                log.write(json.dumps(row) + "\n")
        write_json(out / "round.json", summary)  # written last: the round is finished
    trainer.accelerator.wait_for_everyone()
    return summary


# --- the stage ------------------------------------------------------------------------------------------------------


def run(recipe: Recipe) -> dict | None:
    from rlrec.stages.sft import finish_stage

    config: DPOStageConfig = recipe.section("dpo")
    timer = Timer()
    data = load_run_data(recipe.stage_dir("data"))
    out = recipe.stage_dir("dpo")
    init = init_model_dir(recipe, config.init, "dpo")
    finetune = config.finetune
    rounds: list[dict] = []
    for index in range(1, config.rounds + 1):
        round_dir = out / f"round-{index}"
        if (round_dir / "round.json").is_file():  # finished by an earlier run
            summary = json.loads((round_dir / "round.json").read_text())
            if is_main_process():
                print(f"rlrec dpo round {index}: finished earlier, continuing from {round_dir / 'model'}")
        else:
            summary = train_round(recipe, config, data, init, finetune, round_dir, index)
        rounds.append(summary)
        init, finetune = round_dir / "model", summary["finetune"]  # later rounds train what round 1 trained
    if not is_main_process():
        return None
    shutil.copytree(init, out / "model", dirs_exist_ok=True)
    with (out / "train_log.jsonl").open("w", encoding="utf-8") as log:  # every round's log, in order
        for index in range(1, config.rounds + 1):
            for line in (out / f"round-{index}" / "train_log.jsonl").read_text().splitlines():
                log.write(json.dumps({"round": index, **json.loads(line)}) + "\n")
    if (init.parent / BASE_MODEL_DIR).is_dir():
        shutil.copytree(init.parent / BASE_MODEL_DIR, out / BASE_MODEL_DIR, dirs_exist_ok=True)
    last = rounds[-1]
    summary = {
        "init": rounds[0]["init"], "finetune": last["finetune"], "loss": config.loss, "beta": config.beta,
        "negatives": {"hard": config.negatives.hard, "history": config.negatives.history,
                      "popular": config.negatives.popular, "random": config.negatives.random},
        "global_step": sum(r["global_step"] for r in rounds), "saved_step": last["saved_step"],
        "train_loss": last["train_loss"], "steps_run": sum(r["steps_run"] for r in rounds),
        "world_size": world_size(), "train_seconds": timer.seconds,
        "trainable_parameters": last["trainable_parameters"], "rounds": rounds,
    }  # fmt: skip
    return finish_stage(recipe, out, data, summary, config, timer)


def main(argv: list[str] | None = None) -> int:
    """Entry point for `accelerate launch -m rlrec.stages.dpo --config <recipe> [overrides]`."""
    return stage_main("rlrec.stages.dpo", run, argv)


if __name__ == "__main__":
    sys.exit(main())
