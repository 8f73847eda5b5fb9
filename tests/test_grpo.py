"""GRPO stage with real TRL GRPOTrainer runs (trie-constrained rollouts) on a tiny SFT model and Scientific data."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from transformers import TrainerControl

from rlrec.ablate import AblationGrid, cell_recipe, run_ablation
from rlrec.config import from_dict, load_config
from rlrec.data.prepared import load_run_data
from rlrec.errors import ConfigError
from rlrec.models import load_model
from rlrec.recipe import Recipe
from rlrec.rewards import resolve
from rlrec.schema import EvalConfig, GuardConfig
from rlrec.stages.grpo import inject_targets
from rlrec.stages.grpo import run as run_grpo
from rlrec.training.guard import Guard
from tests.conftest import REPO, grpo_recipe, launch

SEEN: list = []  # items the probe reward saw
SEEN_TARGETS: list = []  # the target of each of them


def record_items(batch, tables):
    """A user reward loaded by dotted path; records every rollout item (weight 0 in the recipe)."""
    SEEN.extend(batch.items)
    SEEN_TARGETS.extend(batch.targets)
    return [0.0] * len(batch.items)


def test_beam_grpo_changes_parameters_and_rollouts_are_catalogue_items(shared_data, sft_run, tmp_path):
    rewards = {"hit": 1.0, "rank_penalty": 1.0, "tests.test_grpo.record_items": 0.0}
    recipe = from_dict(Recipe, grpo_recipe(shared_data, sft_run, tmp_path, rewards=rewards))
    SEEN.clear()
    metrics = run_grpo(recipe)
    catalogue = set(load_run_data(recipe.stage_dir("data")).item_ids)
    assert len(SEEN) == 3 * 2 * 4  # steps x prompts x G
    assert all(item in catalogue for item in SEEN)
    before, _ = load_model(recipe.stage_dir("sft") / "model")
    after, _ = load_model(recipe.stage_dir("grpo") / "model")
    changed = [n for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters(), strict=True)
               if not torch.equal(a, b)]  # fmt: skip
    assert len(changed) >= 5
    training = metrics["training"]
    assert training["global_step"] == 3 and training["rollout"] == "beam" and training["saved_step"] == 3
    assert [g["step"] for g in training["guard"]] == [0, 2, 3]
    assert metrics["test"]["metrics"]["valid_rate"] == 1.0
    log = [json.loads(line) for line in (recipe.stage_dir("grpo") / "train_log.jsonl").read_text().splitlines()]
    logged = {key for row in log for key in row}
    assert {"rewards/hit/mean", "rewards/rank_penalty/mean", "frac_reward_zero_std", "rollout/hit_rate",
            "rollout/groups_with_hit", "rollout/valid_rate"} <= logged  # fmt: skip
    assert all(row["rollout/valid_rate"] == 1.0 for row in log if "rollout/valid_rate" in row)


def test_sample_rollouts_with_lora_on_a_full_model(shared_data, sft_run, tmp_path):
    raw = grpo_recipe(shared_data, sft_run, tmp_path, rollout="sample", finetune="lora", lora={"r": 4, "alpha": 8},
                      rewards={"hit": 1.0, "sid_prefix": 1.0, "tests.test_grpo.record_items": 0.0})  # fmt: skip
    raw["grpo"]["train"]["max_steps"] = 2
    recipe = from_dict(Recipe, raw)
    SEEN.clear()
    metrics = run_grpo(recipe)
    catalogue = set(load_run_data(recipe.stage_dir("data")).item_ids)
    assert len(SEEN) == 2 * 2 * 4 and all(item in catalogue for item in SEEN)
    assert metrics["training"]["finetune"] == "lora"
    assert metrics["training"]["trainable_parameters"] < sum(p.numel() for p in load_model(
        recipe.stage_dir("sft") / "model")[0].parameters())  # fmt: skip
    assert (recipe.stage_dir("grpo") / "model" / "adapter_config.json").is_file()


def test_trl_grpo_options_pass_through(shared_data, sft_run, tmp_path):
    """`num_iterations` 2: each rollout trains two optimizer steps (4 steps, 2 rollouts), the second clipped against
    the policy that generated it; clip-higher and sequence-level importance ratios reach TRL's config."""
    rewards = {"hit": 1.0, "rank_penalty": 1.0, "tests.test_grpo.record_items": 0.0}
    train = {"max_steps": 4, "learning_rate": 0.01, "logging_steps": 1, "save_steps": 100, "report_to": []}
    raw = grpo_recipe(shared_data, sft_run, tmp_path, rewards=rewards, train=train, num_iterations=2,
                      epsilon_high=0.28, importance_sampling_level="sequence",
                      guard={"eval_steps": 0.5, "users": 8})  # fmt: skip
    recipe = from_dict(Recipe, raw)
    SEEN.clear()
    metrics = run_grpo(recipe)
    assert metrics["training"]["global_step"] == 4
    assert len(SEEN) == 2 * 2 * 4  # rollouts x prompts x G
    # eval_steps 0.5: half the planned steps, as transformers reads a fractional eval_steps
    curve = [json.loads(line) for line in (recipe.stage_dir("grpo") / "guard.jsonl").open()]
    assert [entry["step"] for entry in curve] == [0, 2, 4]
    for entry in curve:  # per-user NDCG lies in [0, 1]: its standard deviation is at most 1/2, zero if all equal
        assert 0 <= entry["standard_error"] <= 0.5 / entry["users"] ** 0.5 + 1e-9
        assert (entry["standard_error"] == 0) == (entry["ndcg@10"] in (0.0, 1.0))
    options = metrics["training"]["trl_options"]  # read back from the trainer's trl.GRPOConfig
    assert [options[key] for key in ("num_iterations", "epsilon_high", "importance_sampling_level")] == [
        2, 0.28, "sequence"]  # fmt: skip
    for bad, message in [
        ({"epsilon_high": 0.1}, "grpo.epsilon_high .0.1. is the upper clip: expected >= grpo.epsilon"),
        ({"num_iterations": 0}, "grpo.num_iterations: expected an integer >= 1, got 0"),
        ({"importance_sampling_level": "step"}, "importance_sampling_level"),
        ({"guard": {"eval_steps": 1.5}}, "planned steps in .0, 1., or 'epoch'; got 1.5"),
    ]:
        with pytest.raises(ConfigError, match=message):
            from_dict(Recipe, grpo_recipe(shared_data, sft_run, tmp_path / next(iter(bad)), **bad))


def test_target_injection_puts_the_target_in_every_group(shared_data, sft_run, tmp_path):
    """`inject_target`: every group the reward sees holds its target (the tiny policy alone rarely finds it), the
    rest of the group is the policy's own beam, and the share of groups changed is logged."""
    rewards = {"hit": 1.0, "tests.test_grpo.record_items": 0.0}
    recipe = from_dict(Recipe, grpo_recipe(shared_data, sft_run, tmp_path, rewards=rewards, inject_target=True))
    SEEN.clear(), SEEN_TARGETS.clear()
    run_grpo(recipe)
    groups = [(SEEN[g : g + 4], SEEN_TARGETS[g]) for g in range(0, len(SEEN), 4)]
    assert len(groups) == 3 * 2 and all(target in items for items, target in groups)
    assert all(len(set(items)) == 4 for items, _ in groups)  # distinct: the target replaced a beam, not a copy
    log = [json.loads(line) for line in (recipe.stage_dir("grpo") / "train_log.jsonl").read_text().splitlines()]
    injected = [row["rollout/injected_groups"] for row in log if "rollout/injected_groups" in row]
    assert injected and all(0 <= share <= 1 for share in injected) and max(injected) > 0
    assert inject_targets(["a", "b", "c", "d", "e", "f"], ["b", "z"], 3) == (["a", "b", "c", "d", "e", "z"], 1)


@pytest.mark.parametrize("prompts", [6, 7])
def test_a_grpo_epoch_is_one_pass_over_the_prompts(shared_data, sft_run, tmp_path, prompts):
    """`grpo.train.epochs: 1` is one pass over the prompts, prompts_per_device a step: the recipes' relative unit
    (a step count fits one dataset only). The step count is rounded up, not down as TRL's own epoch count is."""
    rewards = {"hit": 1.0, "tests.test_grpo.record_items": 0.0}
    train = {"epochs": 1, "learning_rate": 0.01, "logging_steps": 1, "save_steps": 100, "report_to": []}
    raw = grpo_recipe(shared_data, sft_run, tmp_path, rewards=rewards, train=train, max_train_prompts=prompts,
                      guard={"eval_steps": 0.5, "users": 4})  # fmt: skip
    recipe = from_dict(Recipe, raw)
    SEEN.clear()
    metrics = run_grpo(recipe)
    steps = -(-prompts // 2)
    assert metrics["training"]["global_step"] == steps and len(SEEN) == steps * 2 * 4


def test_guard_keeps_the_best_weights_and_stops(shared_data, sft_run, tmp_path):
    """The guard evaluates, snapshots the best weights, stops after `patience` evaluations without a gain, and
    restores the best weights: a model ruined after step 0 is saved as it was at step 0."""
    recipe = from_dict(Recipe, grpo_recipe(shared_data, sft_run, tmp_path))
    data = load_run_data(recipe.stage_dir("data"))
    model, tokenizer = load_model(recipe.stage_dir("sft") / "model", trainable=True)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    guard = Guard(model, tokenizer, data, EvalConfig(ks=[10]), GuardConfig(users=16, patience=1),
                  recipe.stage_dir("grpo"), "grpo")  # fmt: skip
    assert recipe.stage_dir("grpo").is_dir()  # the guard makes its folder (its curve goes there)
    control = TrainerControl()
    guard.evaluate(0, control)
    with torch.no_grad():  # ruin it: every logit equal, so no ranking beats the trained one
        model.lm_head.weight.zero_()
    guard.evaluate(1, control)
    assert control.should_training_stop
    assert guard.restore_best() == 0
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())
    assert [json.loads(line)["step"] for line in (recipe.stage_dir("grpo") / "guard.jsonl").open()] == [0, 1]
    # kept step 0: said on the console and in the warnings that go to metrics.json (issue 31)
    guard._warn_if_no_gain(1)
    assert [w["kind"] for w in guard.warnings] == ["validation_fell", "kept_start"]
    assert "saved weights are step 0's" in guard.warnings[-1]["message"]
    guard._warn_if_no_gain(1)  # once
    assert len(guard.warnings) == 2
    ended = Guard(model, tokenizer, data, EvalConfig(ks=[10]), GuardConfig(users=16, keep_best=False),
                  recipe.stage_dir("grpo"), "grpo")  # fmt: skip
    ended.history = [{"step": 0, "ndcg@10": 0.3}, {"step": 5, "ndcg@10": 0.4}, {"step": 9, "ndcg@10": 0.2}]
    ended._warn_if_no_gain(9)
    assert [w["kind"] for w in ended.warnings] == ["ended_below_start"]


def test_a_shadow_split_is_recorded_and_never_chosen_on(shared_data, sft_run, tmp_path):
    """`guard.shadow_split: test` scores test beside validation at every evaluation (for measuring whether
    validation predicts test, bench/valid_test_agreement.py); the best step follows validation only."""
    recipe = from_dict(Recipe, grpo_recipe(shared_data, sft_run, tmp_path))
    data = load_run_data(recipe.stage_dir("data"))
    model, tokenizer = load_model(recipe.stage_dir("sft") / "model", trainable=True)
    guard = Guard(model, tokenizer, data, EvalConfig(ks=[10]), GuardConfig(users=16, shadow_split="test"),
                  recipe.stage_dir("grpo"), "grpo")  # fmt: skip
    control = TrainerControl()
    guard.evaluate(0, control)
    guard.history[0]["ndcg@10"], guard.best = 0.5, (0.5, 0)  # validation says step 0 is far better
    guard.evaluate(1, control)
    assert all("test_ndcg@10" in entry for entry in guard.history)
    assert guard.best[1] == 0  # chosen on validation, whatever test said
    with pytest.raises(ConfigError, match="already selects on test"):
        GuardConfig(shadow_split="test", split="test")


def test_a_smoothed_guard_chooses_on_the_trailing_mean(shared_data, sft_run, tmp_path):
    """`smooth: 3` compares the mean of the last three evaluations: a single peak does not win over a plateau."""
    recipe = from_dict(Recipe, grpo_recipe(shared_data, sft_run, tmp_path))
    data = load_run_data(recipe.stage_dir("data"))
    model, tokenizer = load_model(recipe.stage_dir("sft") / "model", trainable=True)
    guard = Guard(model, tokenizer, data, EvalConfig(ks=[10]), GuardConfig(users=16, smooth=3),
                  recipe.stage_dir("grpo"), "grpo")  # fmt: skip
    guard.history = [{"step": 0, "ndcg@10": 0.9}, {"step": 1, "ndcg@10": 0.1}]  # a peak, then a fall
    guard.best = (0.9, 0)
    guard.evaluate(2, TrainerControl())
    raw = guard.history[-1]["ndcg@10"]
    assert guard.history[-1]["smoothed"] == pytest.approx((0.9 + 0.1 + raw) / 3)
    assert guard.best == (0.9, 0)  # the smoothed value (at most 0.67) does not beat the recorded best
    with pytest.raises(ConfigError, match="smooth must be >= 1"):
        GuardConfig(smooth=0)


@pytest.mark.distributed
@pytest.mark.slow(reason="two GRPO processes under accelerate launch: ~15 s")
def test_grpo_two_cpu_processes(shared_data, sft_run, tmp_path):
    raw = grpo_recipe(shared_data, sft_run, tmp_path, rewards={"hit": 1.0, "ndcg": 1.0})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = launch("accelerate_configs/cpu_2proc.yaml", path, module="rlrec.stages.grpo")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2" in result.stdout
    training = json.loads((tmp_path / "tiny" / "grpo" / "metrics.json").read_text())["training"]
    assert training["world_size"] == 2 and training["global_step"] == 3


@pytest.mark.slow(reason="four GRPO cells, each its own rlrec process: ~30 s")
def test_ablation_grid_runs_cells_and_tabulates(shared_data, sft_run, tmp_path):
    import csv

    raw = grpo_recipe(shared_data, sft_run, tmp_path)
    raw["grpo"]["train"]["max_steps"] = 2
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(raw))
    grid = tmp_path / "tiny_grid.yaml"  # the grid names its recipe: `rlrec ablate --config <grid>`
    grid.write_text(yaml.safe_dump({"recipe": str(config), "seeds": [0, 1], "reference": "hit",
                                    "reward_sets": {"hit+ndcg": {"hit": 1.0, "ndcg": 1.0}, "hit": {"hit": 1.0}}},
                                   sort_keys=False))  # fmt: skip
    report = run_ablation(str(grid), jobs=2)
    assert list(report["results"]) == ["hit+ndcg", "hit"] and report["reference"] == "hit"
    for cell in report["results"].values():
        assert [r["seed"] for r in cell["runs"]] == [0, 1] and all(r["global_step"] == 2 for r in cell["runs"])
        assert cell["summary"]["ndcg@10"]["mean"] == pytest.approx(
            sum(r["metrics"]["ndcg@10"] for r in cell["runs"]) / 2)  # fmt: skip
        assert all(r["reward_curve"] and r["reward_curve"][-1][0] == 2 for r in cell["runs"])
    results = report["results"]
    diff = results["hit+ndcg"]["summary"]["ndcg@10"]["mean"] - results["hit"]["summary"]["ndcg@10"]["mean"]
    assert results["hit+ndcg"]["diff_vs_reference"]["ndcg@10"] == pytest.approx(diff)
    out = tmp_path / "tiny" / "ablations" / "tiny_grid"

    table = (out / "table.md").read_text()
    assert "| SFT (start) |" in table and "| hit+ndcg (GRPO, 2 seeds) |" in table and "NDCG@10 - hit" in table
    assert f"{diff:+.4f}" in table and "| reference |" in table
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["model"] for r in rows] == ["sft", "hit+ndcg", "hit"]
    assert float(rows[1]["ndcg@10_mean"]) == pytest.approx(results["hit+ndcg"]["summary"]["ndcg@10"]["mean"], abs=1e-6)
    assert float(rows[1]["ndcg@10_diff_vs_hit"]) == pytest.approx(diff, abs=1e-6) and rows[1]["seeds"] == "2"
    assert rows[1]["rewards"] == "hit:1;ndcg:1" and float(rows[2]["ndcg@10_diff_vs_hit"]) == 0.0
    png = (out / "ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (out / "cells" / "hit+ndcg-s1" / "sft").is_symlink()
    # a rerun finds every cell done and only re-tabulates; the recipe + grid form gives the same table
    assert run_ablation(str(config), str(grid), jobs=2)["results"].keys() == report["results"].keys()


def test_shipped_ablation_grids_parse(tmp_path):
    """Every grid parses, names known rewards, and every cell recipe it would write is a valid recipe."""
    paths = sorted((REPO / "recipes").rglob("ablations/*.yaml"))  # each beside its dataset's recipes
    assert paths
    for path in paths:
        grid = load_config(AblationGrid, path)
        for rewards in grid.reward_sets.values():
            for name in rewards:
                resolve(name)
        # a grid without its own recipe is run with --grid against a GRPO recipe (its header says which)
        base = load_config(Recipe, REPO / (grid.recipe or "recipes/amazon18-scientific/grpo_sid.yaml"))
        for name in grid.names:
            cell = from_dict(Recipe, cell_recipe(base, grid, name, grid.seeds[0], tmp_path))
            section = cell.section(grid.stage(name))  # raises when the cell lacks its stage's section
            if grid.stage(name) == "grpo":
                for reward in section.rewards:
                    resolve(reward)


@pytest.mark.slow(reason="an ablation stopped by SIGTERM while its cells train: ~30 s")
def test_a_stopped_ablation_stops_its_cells(shared_data, sft_run, tmp_path):
    """SIGTERM to `rlrec ablate` alone (what `timeout` and schedulers send) reaches the cells it started: none keeps
    training, and the command ends as stopped (143)."""
    import psutil

    raw = grpo_recipe(shared_data, sft_run, tmp_path)
    raw["grpo"]["train"]["max_steps"] = 200  # far longer than the test waits
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(raw))
    grid = tmp_path / "long_grid.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "recipe": str(config),
                "seeds": [0],
                "reference": "hit",
                "reward_sets": {"hit": {"hit": 1.0}, "hit+ndcg": {"hit": 1.0, "ndcg": 1.0}},
            }
        )
    )
    ablate = subprocess.Popen([sys.executable, "-m", "rlrec.cli", "ablate", "--config", str(grid), "--jobs", "2"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.time() + 300
    cells: list[psutil.Process] = []
    while time.time() < deadline and len(cells) < 2:
        assert ablate.poll() is None, ablate.stdout.read()[-3000:]
        cells = [p for p in psutil.Process(ablate.pid).children() if "grpo" in " ".join(p.cmdline())]
        time.sleep(0.2)
    assert len(cells) == 2
    ablate.send_signal(signal.SIGTERM)
    assert ablate.wait(timeout=180) == 143, ablate.stdout.read()[-3000:]
    gone, alive = psutil.wait_procs(cells, timeout=30)
    assert not alive, [p.cmdline() for p in alive]


def test_grpo_trains_under_activation_checkpointing(shared_data, sft_run, tmp_path):
    """Activation checkpointing turns the KV cache off in training, so the shared-prompt log-probabilities cannot
    run; TRL's full rows are used then. Before: AttributeError 'NoneType' object has no attribute 'reorder_cache'
    (measured with SmolLM2 on Scientific, where checkpointing keeps GRPO under 3 GB)."""
    train = {"max_steps": 2, "learning_rate": 0.01, "logging_steps": 1, "save_steps": 100, "report_to": [],
             "gradient_checkpointing": True}  # fmt: skip
    recipe = from_dict(Recipe, grpo_recipe(shared_data, sft_run, tmp_path, finetune="lora", lora={"r": 4, "alpha": 8},
                                           train=train))  # fmt: skip
    metrics = run_grpo(recipe)
    assert metrics["training"]["global_step"] == 2 and metrics["test"]["metrics"]["valid_rate"] == 1.0
