"""Post-training levers: the SASRec teacher reward, fresh targets held back from SFT, and the warnings a user sees
when a run has no learning signal."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from rlrec.baselines import encode_histories, load_sasrec
from rlrec.config import from_dict
from rlrec.data.prepared import load_run_data, training_sequences
from rlrec.decoding.inputs import ModelInputs
from rlrec.models import build_tokenizer
from rlrec.recipe import Recipe
from rlrec.rewards import RewardBatch, compute, resolve
from rlrec.schema import SASRecConfig
from rlrec.stages import data as data_stage
from rlrec.stages import grpo, sasrec
from rlrec.stages.grpo import item_tables
from rlrec.stages.posttrain import train_prompts
from rlrec.training.sft_rows import sequence_rows, target_rows
from tests.conftest import tiny_pipeline


@pytest.fixture(scope="module")
def sasrec_run(tmp_path_factory):
    """A tiny synthetic run with a trained SASRec (the teacher)."""
    out = tmp_path_factory.mktemp("teacher")
    raw = tiny_pipeline(out)
    raw["sasrec"] = {"hidden": 16, "blocks": 1, "max_len": 5, "max_epochs": 8, "patience": 8, "threads": 1}
    recipe = from_dict(Recipe, raw)
    data_stage.run(recipe)
    sasrec.run(recipe)
    return recipe


def test_teacher_reward_is_the_trained_sasrec_log_probability(sasrec_run):
    recipe = sasrec_run
    data = load_run_data(recipe.stage_dir("data"))
    tables = item_tables(recipe, data, {"teacher": 1.0})
    rows = data.rows("train").select(range(6))
    items = [data.item_ids[(3 * i) % len(data.item_ids)] for i in range(12)]  # 2 completions per row
    histories = [list(rows["history"][i // 2]) for i in range(12)]
    batch = RewardBatch(items, [rows["target"][i // 2] for i in range(12)], histories, [None] * 12, group_size=2)
    values = compute("teacher", resolve("teacher"), batch, tables, {})
    model = load_sasrec(recipe.stage_dir("sasrec"), from_dict(SASRecConfig, {"hidden": 16, "blocks": 1, "max_len": 5}))
    index = {item: i + 1 for i, item in enumerate(data.item_ids)}
    with torch.no_grad():
        logprobs = torch.log_softmax(model.eval().scores(encode_histories(histories, index, 5)), dim=-1).numpy()
    expected = [float(logprobs[i, data.item_ids.index(item)]) for i, item in enumerate(items)]
    assert values == pytest.approx(expected, abs=1e-5)
    assert len(set(np.round(values, 4))) > 6  # graded: a gradient in every group, hit or not
    ranks = compute("teacher", resolve("teacher"), batch, tables, {"kind": "ndcg"})
    best = int(np.argmax(logprobs[0]))
    top = RewardBatch([data.item_ids[best]], [rows["target"][0]], [histories[0]], [None], group_size=1)
    assert compute("teacher", resolve("teacher"), top, tables, {"kind": "ndcg"}) == [1.0]  # its first choice
    # NDCG of the teacher's rank: a decreasing function of the rank, so it orders the items as the log-probabilities do
    assert len(set(ranks)) > 6
    assert all(ranks[i] >= ranks[j] for i in range(12) for j in range(12) if values[i] > values[j])


def test_grpo_with_teacher_reward_has_signal_and_hit_only_run_warns(sasrec_run, tmp_path):
    """Same tiny model and rollouts: with `hit` alone (a random-ish SFT model over 40 items rarely hits in G=2)
    the stage warns that groups carry no gradient; with the teacher reward every group has one."""
    shutil.copytree(sasrec_run.run_dir, tmp_path / "pipe")
    raw = tiny_pipeline(tmp_path)
    raw["sft"]["train"]["max_steps"] = 2
    raw["sasrec"] = {"hidden": 16, "blocks": 1, "max_len": 5}
    from rlrec.stages import sft

    sft.run(from_dict(Recipe, raw))
    results = {}
    for rewards in ({"hit": 1.0}, {"teacher": 1.0}):
        raw["grpo"] = {"num_generations": 2, "prompts_per_device": 8, "rewards": rewards, "max_train_prompts": 64,
                       "train": {"max_steps": 4, "learning_rate": 0.001, "logging_steps": 1, "report_to": []},
                       "guard": {"eval_steps": 2, "users": 20}, "eval_max_users": 20}  # fmt: skip
        results[next(iter(rewards))] = grpo.run(from_dict(Recipe, raw))["training"]
        shutil.rmtree(tmp_path / "pipe" / "grpo")
    hit, teacher = results["hit"], results["teacher"]
    kinds = [w["kind"] for w in hit["warnings"]]
    assert kinds[0] == "zero_variance" and hit["warnings"][0]["share"] >= 0.5
    # the guard says so when no evaluation beat the SFT model it started from (issue 31), and only then
    assert set(kinds) <= {"zero_variance", "kept_start"} and ("kept_start" in kinds) == (hit["saved_step"] == 0)
    assert "carry no gradient" in hit["warnings"][0]["message"]
    assert not [w for w in teacher["warnings"] if w["kind"] == "zero_variance"]


def test_held_back_targets_never_reach_sft_and_are_the_rl_prompts(prepared):
    data = load_run_data(prepared)
    tokenizer = build_tokenizer(["History:", *data.identifiers.values()])
    from rlrec.schema import PromptConfig

    prompt = PromptConfig(format="sequence", identifier="sid", template="History: {history}", separator=" ")
    inputs = ModelInputs.build(tokenizer, data.identifiers, prompt)
    sequences = dict(training_sequences(data, with_users=True))
    rl = train_prompts(data, "last", None, seed=0)  # what GRPO / DPO train on with train_rows: last
    held = {user: target for user, target in zip(rl["user"], rl["target"], strict=True)}
    assert all(sequences[user][-1] == target for user, target in held.items())
    assert len(held) == len(sequences)
    # sequence rows: each row is a window of the user's training items without the last one
    rows = sequence_rows(data, inputs, min_history=1, hold_out_last=True)
    by_tokens = {tuple(block): item for item, block in inputs.blocks.items()}
    for ids, user in zip(rows["input_ids"], rows["user"], strict=True):
        body = ids[len(inputs.prefix) :]
        items = [by_tokens[tuple(body[i : i + 4])] for i in range(0, len(body), 4)]
        kept = sequences[user][:-1]
        assert any(kept[s : s + len(items)] == items for s in range(len(kept) - len(items) + 1)), user
    assert sum(rows["targets"]) == len(data.rows("train")) - len(held)
    # per-target rows: every row but the users' last ones
    targets = target_rows(data, inputs, hold_out_last=True)
    assert len(targets) == len(data.rows("train")) - len(held)


def test_hold_out_last_chat_sft_trains_on_every_row_but_the_last(shared_data, prepared, tmp_path):
    from rlrec.stages.sft import training_rows
    from tests.conftest import recipe_with_data

    recipe = recipe_with_data(shared_data, prepared, tmp_path, hold_out_last=True)
    data = load_run_data(recipe.stage_dir("data"))
    rows = training_rows(recipe.sft, data, None, seed=0)
    rl = train_prompts(data, "last", None, seed=0)
    held = {user: len(history) for user, history in zip(rl["user"], rl["history"], strict=True)}
    assert len(rows) == len(data.rows("train")) - len(held)
    longest: dict[str, int] = {}
    for user, history in zip(rows["user"], rows["history"], strict=True):
        longest[user] = max(longest.get(user, 0), len(history))
    # a user's rows are the prefixes of their training items: the held-back one is the longest, and it is gone
    # (histories are capped at max_history, so compare only where the held-back history is below the cap)
    capped = data.stats["max_history"]
    assert all(longest.get(user, 0) < length for user, length in held.items() if length < capped)
