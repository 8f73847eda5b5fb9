"""Preference stage: DPO and multi-negative S-DPO from the SFT model, with mined negatives.

    rlrec dpo --config recipes/<dataset>/dpo_<variant>.yaml                        (one process)
    accelerate launch --config_file accelerate_configs/<x>.yaml -m rlrec.stages.dpo --config <recipe>

Preference data (`rlrec.training.preferences`). Each training prompt's target is "chosen"; the "rejected" items
come from `hard` (the current model's constrained top beam), `history`, `popular` and `random` sources, filtered
and counted; the counts are in `metrics.json` (`training.rounds[i].negatives`).

Losses. `loss: dpo` is TRL's `DPOTrainer` unchanged (any of its `dpo_loss_type`s): each negative makes one
(prompt, chosen, rejected) pair. `loss: sdpo` scores all K negatives of a prompt in one softmax
(`rlrec.training.sdpo`). Completions are the items' token sequences from the catalogue trie.

Iterative mode (`rounds` > 1, OneRec's iterative preference alignment without its reward model): each round mines
hard negatives with the model the previous round produced, trains against that model as the reference, and saves
`round-<r>/model`. A rerun skips finished rounds and resumes an unfinished one from its last checkpoint.
`dpo/train_log.jsonl` holds every round's TRL log (rewards/chosen, rewards/margins, ...) with its round number.

Every round is eval-gated like GRPO (`rlrec.training.guard`): it keeps the best weights on a validation slice,
the round's starting model included. The final model is `dpo/model`, evaluated on `eval_splits` in `metrics.json`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import trl

from rlrec.data.prepared import RunData, load_run_data
from rlrec.decoding.beam import padding_id
from rlrec.decoding.inputs import ModelInputs
from rlrec.errors import RlrecError
from rlrec.evaluate import check_ks
from rlrec.models import BASE_MODEL_DIR
from rlrec.recipe import Recipe, stage_inputs
from rlrec.schema import DPOConfig
from rlrec.stages.posttrain import init_model_dir, load_policy, train_prompts
from rlrec.stages.runner import (
    Timer,
    build_trainer,
    finish,
    policy_report,
    stage_main,
    train_and_save,
    world_size,
    write_json,
)
from rlrec.training.arguments import is_main_process, training_arguments, wants_plain_lm_head
from rlrec.training.diagnostics import Diagnostics
from rlrec.training.guard import Guard
from rlrec.training.preferences import build_preferences, mine_hard_negatives, tokenize_preferences
from rlrec.training.sdpo import MultiNegativeCollator, sdpo_step
from rlrec.upstream import copy_reference_tokens, preference_trainer, unfuse_lm_head, unwrap_peft

# --- one round ------------------------------------------------------------------------------------------------------


def preference_rows(recipe: Recipe, config: DPOConfig, data: RunData, policy, inputs: ModelInputs,
                    round_index: int) -> tuple[list[dict], dict, float]:  # fmt: skip
    """(preference records, their report, seconds spent mining): this round's training prompts, each with its target
    and `negatives.total` negatives (hard ones mined by the round's starting model, the rest by popularity)."""
    timer = Timer()
    seed = recipe.seed + round_index - 1
    rows = train_prompts(data, config.train_rows, config.max_train_prompts, seed)[:]
    hard = None
    if config.negatives.hard:
        if torch.cuda.is_available():
            policy.model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")  # mine on this process's GPU
        hard = mine_hard_negatives(policy.model, policy.tokenizer, inputs, rows, config.negatives.hard,
                                   recipe.eval.exclude_history, config.negatives.beam_batch_size)  # fmt: skip
    mined_seconds = timer.seconds
    records, report = build_preferences(rows, data.item_ids, data.popularity, config.negatives, hard, seed)
    if not records:
        raise RlrecError(f"dpo round {round_index}: no preference rows left ({report})")
    return records, report, mined_seconds


def dpo_arguments(config: DPOConfig, out: Path, seed: int) -> trl.DPOConfig:
    """TRL's DPOConfig for one round; pairwise DPO adds TRL's own `sft` term, S-DPO adds it in `sdpo_step`."""
    loss_types, loss_weights = list(config.dpo_loss_type), [1.0] * len(config.dpo_loss_type)
    if config.sft_weight and config.loss != "sdpo":
        loss_types, loss_weights = [*loss_types, "sft"], [*loss_weights, config.sft_weight]
    return trl.DPOConfig(**training_arguments(config.train, out, seed), beta=config.beta, loss_type=loss_types,
                         loss_weights=loss_weights, max_length=None, precompute_ref_log_probs=False)  # fmt: skip


def train_round(recipe: Recipe, config: DPOConfig, data: RunData, init: Path, finetune: str, out: Path,
                round_index: int) -> dict:  # fmt: skip
    """Mine negatives with the model in `init`, train one preference round against it, save `out/model`."""
    timer = Timer()
    policy = load_policy(init, finetune, config.lora, data)
    model, tokenizer = policy.model, policy.tokenizer
    inputs = ModelInputs.build(tokenizer, data.identifiers, data.prompt)
    records, report, mined_seconds = preference_rows(recipe, config, data, policy, inputs, round_index)
    sdpo = config.loss == "sdpo"
    dataset = tokenize_preferences(records, tokenizer, inputs, pairwise=not sdpo)
    args = dpo_arguments(config, out, recipe.seed)
    # A full model trains against a frozen copy of itself as loaded; an adapter against TRL's "ref" adapter copy.
    ref_model = None
    if policy.finetune == "full":
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    pad_id = padding_id(tokenizer, inputs.trie)
    out.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(
        "dpo",
        out,
        lambda: preference_trainer(
            sdpo_step(config.negatives.total, config.sft_weight) if sdpo else None,
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=policy.peft_config,
            data_collator=MultiNegativeCollator(pad_id) if sdpo else None,
        ),
    )
    copy_reference_tokens(trainer.accelerator.unwrap_model(trainer.model))
    if wants_plain_lm_head(config.train.lm_head, trainer.model):
        unfuse_lm_head(unwrap_peft(trainer.model))
        if trainer.ref_model is not None:
            unfuse_lm_head(trainer.accelerator.unwrap_model(trainer.ref_model))
    guard = Guard(trainer.model, tokenizer, data, recipe.eval, config.guard, out, "dpo", inputs)
    diagnostics = Diagnostics(f"dpo round {round_index}")
    trainer.add_callback(diagnostics)
    details = (f"{config.loss} ({policy.finetune}) from {init}, {report['prompts']:,} prompts x "
               f"{config.negatives.total} negatives ({len(dataset):,} rows), negatives: {report}")  # fmt: skip
    label = f"dpo round {round_index}/{config.rounds}"
    fitted, saved_step = train_and_save(trainer, out, label, details, config.train.resume,
                                        stage_inputs(recipe, "dpo"), guard, config.guard.keep_best, policy)  # fmt: skip
    summary = {
        "round": round_index, "init": str(init), "finetune": policy.finetune, "negatives": report,
        "rows": len(dataset), "saved_step": saved_step, "mining_seconds": mined_seconds, **fitted,
        "seconds": timer.seconds, "guard": guard.history, "warnings": diagnostics.warnings + guard.warnings,
    }  # fmt: skip
    if is_main_process():
        write_json(out / "round.json", summary)  # written last: the round is finished
    trainer.accelerator.wait_for_everyone()  # every process sees the round finished before the next one starts
    return summary


# --- the stage ------------------------------------------------------------------------------------------------------


def run(recipe: Recipe) -> dict | None:
    config: DPOConfig = recipe.section("dpo")
    timer = Timer()
    data = load_run_data(recipe.stage_dir("data"))
    check_ks(recipe.eval.ks, data)  # before training, not after it
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
        "warnings": [{**w, "round": r["round"]} for r in rounds for w in r.get("warnings", [])],
    }  # fmt: skip
    return finish(recipe, "dpo", data, summary, config.eval_splits, config.eval_max_users, timer)


def report(recipe: Recipe, metrics: dict) -> list[str]:
    """What `rlrec dpo` prints."""
    return policy_report(recipe, "dpo", metrics)


def main(argv: list[str] | None = None) -> int:
    """Entry point for `accelerate launch -m rlrec.stages.dpo --config <recipe> [overrides]`."""
    return stage_main("rlrec.stages.dpo", run, argv)


if __name__ == "__main__":
    sys.exit(main())
