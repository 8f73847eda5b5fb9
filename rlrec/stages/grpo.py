"""GRPO stage: reinforcement learning from verifiable ranking rewards, starting from the SFT model.

    rlrec grpo --config recipes/<dataset>/grpo_<variant>.yaml                      (one process)
    accelerate launch --config_file accelerate_configs/<x>.yaml -m rlrec.stages.grpo --config <recipe>

TRL's `GRPOTrainer`, composed and not forked: we hand it a `rollout_func` that decodes through the catalogue trie,
so every completion is a real item. Two rollout modes:
- `beam`: one constrained beam search of width G per prompt returns G distinct items (MiniOneRec's rollout); each
  completion's beam rank reaches the rewards (`rank_penalty`, `ndcg`);
- `sample`: G constrained samples per prompt at `temperature` (TRL's usual estimator; items may repeat).
Rewards are `rlrec.rewards` functions with weights from the recipe. TRL's loss types, reward scaling, clipping and
KL coefficient are exposed as they are.

The guard (`rlrec.training.guard`). A naive RL stage made a converged SFT model worse on real data
(docs/grpo.md: -34% valid NDCG@10 in 300 steps). So the stage evaluates NDCG@10 on a
held-out slice of the validation users at step 0 and every `guard.eval_steps`, keeps the best weights, stops after
`guard.patience` evaluations without a gain, and saves the best model: the stage can never return a model worse on
validation than the one it started from. The curve is in `guard.jsonl` and `metrics.json`.
"""

from __future__ import annotations

import json
import math
import sys

import torch
import trl

from rlrec.baselines import encode_histories, load_sasrec
from rlrec.data.prepared import RunData, load_run_data, training_sequences
from rlrec.decoding import sample_items
from rlrec.decoding.beam import beam_search, encode_prompts, left_pad, padding_id
from rlrec.decoding.inputs import ModelInputs
from rlrec.errors import RlrecError
from rlrec.evaluate import check_ks
from rlrec.recipe import Recipe, stage_inputs
from rlrec.rewards import ItemTables, RewardBatch, compute, resolve
from rlrec.schema import GRPOConfig, SASRecConfig
from rlrec.stages.posttrain import init_model_dir, load_policy, train_prompts
from rlrec.stages.runner import (
    Timer,
    build_trainer,
    finish,
    policy_report,
    stage_main,
    train_and_save,
    world_size,
)
from rlrec.training.arguments import is_main_process, training_arguments, wants_plain_lm_head
from rlrec.training.diagnostics import Diagnostics
from rlrec.training.guard import Guard
from rlrec.upstream import generation_model, grpo_trainer, log_metric, unfuse_lm_head, unwrap_peft

# --- rollouts ---------------------------------------------------------------------------------------------------


def _groups(prompts: list, size: int) -> list:
    """The unique prompts of TRL's batch, which repeats each prompt G times in a row (checked, not assumed)."""
    if len(prompts) % size:
        raise RlrecError(f"rollout got {len(prompts)} prompts, not a multiple of num_generations={size}")
    unique = prompts[::size]
    for g, prompt in enumerate(unique):
        if any(p != prompt for p in prompts[g * size : (g + 1) * size]):
            raise RlrecError("rollout: TRL's prompt batch is not G copies of each prompt in a row")
    return unique


def prompt_encoder(inputs: ModelInputs, tokenizer, dataset):
    """Prompts as TRL hands them to the rollout (the dataset's `prompt` column) -> token ids. In the sequence format
    a prompt's ids come from its history, looked up in the training prompts (equal prompts, equal histories)."""
    if inputs.format == "chat":
        return lambda prompts: encode_prompts(tokenizer, prompts, inputs.answer)
    history = {json.dumps(p, sort_keys=True): h for p, h in zip(dataset["prompt"], dataset["history"], strict=True)}
    return lambda prompts: [inputs.history_ids(history[json.dumps(p, sort_keys=True)]) for p in prompts]


def make_rollout(inputs: ModelInputs, encode, tokenizer, config: GRPOConfig):
    """The `rollout_func` for GRPOTrainer: prompts -> G catalogue items each (token ids, item ids, beam ranks)."""
    size, trie = config.num_generations, inputs.trie
    pad_id = padding_id(tokenizer, trie)
    position = {item: i for i, item in enumerate(trie.item_ids)}

    def rollout(prompts: list, trainer) -> dict:
        unique = _groups(prompts, size)
        encoded = encode(unique)
        ids, mask = left_pad(encoded, pad_id)
        device = trainer.accelerator.device
        with generation_model(trainer) as model:
            was_training = model.training
            model.eval()
            if config.rollout == "beam":
                indices, _ = beam_search(model, trie, ids.to(device), mask.to(device), size)
                if bool((indices < 0).any()):
                    raise RlrecError(f"beam rollout found fewer than G={size} items; lower grpo.num_generations")
                items = [trie.item_ids[int(i)] for i in indices.reshape(-1)]
                ranks = list(range(size)) * len(unique)
            else:
                items = sample_items(model, trie, ids.to(device), mask.to(device), size, config.temperature, pad_id)
                ranks = [None] * len(items)
            if was_training:
                model.train()
        if config.inject_target:
            targets = [row["target"] for row in trainer.rollout_rows[::size]]
            items, injected = inject_targets(items, targets, size)
            log_metric(trainer, "rollout/injected_groups", injected / len(unique))
        return {
            "prompt_ids": [encoded[i // size] for i in range(len(items))],
            "completion_ids": [list(trie.sequences[position[item]]) for item in items],
            "logprobs": None,  # TRL recomputes them under the policy (the constraint mask is not in the ratio)
            "item": items,
            "beam_rank": ranks,
        }

    return rollout


def inject_targets(items: list[str], targets: list[str], size: int) -> tuple[list[str], int]:
    """Target injection: in each group of `size` rollout items without its target, the last (lowest-ranked) item
    replaced by the target. Returns the new items and the number of groups changed. Group-relative advantages then
    push the target up and the group's other items down even where the policy never sampled the target."""
    items = list(items)
    injected = 0
    for group, target in enumerate(targets):
        members = items[group * size : (group + 1) * size]
        if target not in members:
            items[(group + 1) * size - 1] = target
            injected += 1
    return items, injected


# --- rewards ------------------------------------------------------------------------------------------------------


def reward_functions(config: GRPOConfig, tables: ItemTables) -> list:
    """One TRL reward function per recipe reward (named, for TRL's `rewards/<name>/mean` logs). The first also logs
    the rollout's hit rate, the share of groups with at least one hit, and the valid rate."""
    size = config.num_generations
    funcs = []
    for position, name in enumerate(config.rewards):
        fn, params = resolve(name), config.reward_params.get(name, {})

        def trl_reward(prompts, completions, completion_ids, item, beam_rank, target, history, log_metric=None,
                       _name=name, _fn=fn, _params=params, _first=position == 0, **_):  # fmt: skip
            batch = RewardBatch(list(item), list(target), [list(h) for h in history], list(beam_rank), size)
            if _first and log_metric is not None:
                hits = [a == b for a, b in zip(batch.items, batch.targets, strict=True)]
                groups = [any(hits[g : g + size]) for g in range(0, len(hits), size)]
                log_metric("rollout/hit_rate", sum(hits) / len(hits))
                log_metric("rollout/groups_with_hit", sum(groups) / len(groups))
                log_metric("rollout/valid_rate", sum(i in tables.identifiers for i in batch.items) / len(hits))
            return compute(_name, _fn, batch, tables, _params)

        trl_reward.__name__ = name.rpartition(".")[2]
        funcs.append(trl_reward)
    return funcs


def item_tables(recipe: Recipe, data: RunData, rewards: dict) -> ItemTables:
    teacher = sasrec_teacher(recipe, data) if "teacher" in rewards else None
    return ItemTables(
        item_ids=data.item_ids, identifiers=data.identifiers, popularity=data.popularity,
        sequences=training_sequences(data), titles=data.titles,
        cache_dir=recipe.run_dir / "cache", teacher=teacher,
    )  # fmt: skip


def sasrec_teacher(recipe: Recipe, data: RunData):
    """The run's trained SASRec (`rlrec baseline sasrec`) as the `teacher` reward's scorer: histories -> log-softmax
    of its scores over the catalogue, one row per history."""
    folder = recipe.stage_dir("sasrec")
    if not (folder / "model.pt").is_file():
        raise RlrecError(f"reward 'teacher' needs the run's SASRec at {folder}: run `rlrec baseline sasrec` first")
    model = load_sasrec(folder, recipe.sasrec or SASRecConfig()).eval()
    index = {item: i + 1 for i, item in enumerate(data.item_ids)}

    @torch.no_grad()
    def score(histories: list[list[str]]):
        scores = model.scores(encode_histories(histories, index, model.config.max_len))
        return torch.log_softmax(scores, dim=-1).numpy()

    return score


# --- the stage ------------------------------------------------------------------------------------------------------


def pass_steps(epochs: float, prompts: int, prompts_per_step: int, num_iterations: int = 1) -> int:
    """Optimizer steps for `epochs` passes over the prompts, rounded up: as many rollouts as prompts (or more).
    TRL's own epoch count rounds down, dropping a last partial step (7 of MovieLens-100K's 943 prompts at 8 a
    step); past its first pass TRL's sampler draws whole steps from a reshuffled one. Each rollout trains
    `num_iterations` steps. 8,317 Scientific prompts at 8 a step: 1,040 steps, the step count its recipe used."""
    return max(1, math.ceil(epochs * prompts / prompts_per_step)) * num_iterations


# the policy-optimisation settings read back from TRL's GRPOConfig into metrics.json
TRL_OPTIONS = ("loss_type", "scale_rewards", "beta", "epsilon", "epsilon_high", "num_iterations",
               "importance_sampling_level")  # fmt: skip


def run(recipe: Recipe) -> dict | None:
    config: GRPOConfig = recipe.section("grpo")
    recipe.check()  # the reward names, before the model loads
    timer = Timer()
    data = load_run_data(recipe.stage_dir("data"))
    check_ks(recipe.eval.ks, data)  # before training, not after it
    out = recipe.stage_dir("grpo")
    policy = load_policy(init_model_dir(recipe, config.init, "grpo"), config.finetune, config.lora, data)
    model, tokenizer = policy.model, policy.tokenizer
    funcs = reward_functions(config, item_tables(recipe, data, config.rewards))
    inputs = ModelInputs.build(tokenizer, data.identifiers, data.prompt)
    dataset = train_prompts(data, config.train_rows, config.max_train_prompts, recipe.seed)
    kwargs = training_arguments(config.train, out, recipe.seed)
    # one rollout per optimizer step for its prompts_per_device prompts, trained in train.grad_accum micro-batches
    # (TRL's steps_per_generation defaults to the accumulation steps): a large model's memory is a micro-batch's
    completions = config.prompts_per_device * config.num_generations
    kwargs["per_device_train_batch_size"] = completions // config.train.grad_accum
    if config.train.max_steps <= 0:  # epochs are passes over the prompts, whatever the dataset's size
        kwargs["max_steps"] = pass_steps(config.train.epochs, len(dataset), config.prompts_per_device * world_size(),
                                         config.num_iterations)  # fmt: skip
    args = trl.GRPOConfig(
        **kwargs, num_generations=config.num_generations, max_completion_length=inputs.trie.max_length,
        beta=config.beta, loss_type=config.loss_type, scale_rewards=config.scale_rewards, epsilon=config.epsilon,
        epsilon_high=config.epsilon_high, num_iterations=config.num_iterations,
        importance_sampling_level=config.importance_sampling_level,
        reward_weights=list(config.rewards.values()), temperature=config.temperature, log_completions=False,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(
        "grpo",
        out,
        lambda: grpo_trainer(
            model=model,
            reward_funcs=funcs,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=policy.peft_config,
            rollout_func=make_rollout(inputs, prompt_encoder(inputs, tokenizer, dataset), tokenizer, config),
        ),
    )
    if wants_plain_lm_head(config.train.lm_head, trainer.model):
        unfuse_lm_head(unwrap_peft(trainer.model), config.temperature)
    guard = Guard(trainer.model, tokenizer, data, recipe.eval, config.guard, out, "grpo", inputs)
    diagnostics = Diagnostics("grpo")
    trainer.add_callback(diagnostics)
    details = (f"{policy.finetune} fine-tuning from {policy.init}, {config.rollout} rollouts G={config.num_generations}"
               f", rewards {config.rewards}, {len(dataset):,} prompts")  # fmt: skip
    inputs_record = stage_inputs(recipe, "grpo")
    summary, saved_step = train_and_save(trainer, out, "grpo", details, config.train.resume, inputs_record, guard,
                                         config.guard.keep_best, policy)  # fmt: skip
    summary.update(init=str(policy.init), finetune=policy.finetune, rollout=config.rollout,
                   num_generations=config.num_generations, rewards=config.rewards, saved_step=saved_step,
                   train_seconds=timer.seconds, train_prompts=len(dataset), guard=guard.history,
                   warnings=diagnostics.warnings + guard.warnings,
                   trl_options={key: getattr(trainer.args, key) for key in TRL_OPTIONS})  # fmt: skip
    if not is_main_process():
        return None
    return finish(recipe, "grpo", data, summary, config.eval_splits, config.eval_max_users, timer, inputs)


def report(recipe: Recipe, metrics: dict) -> list[str]:
    """What `rlrec grpo` prints."""
    return policy_report(recipe, "grpo", metrics)


def main(argv: list[str] | None = None) -> int:
    """Entry point for `accelerate launch -m rlrec.stages.grpo --config <recipe> [overrides]`."""
    return stage_main("rlrec.stages.grpo", run, argv)


if __name__ == "__main__":
    sys.exit(main())
