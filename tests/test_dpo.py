"""Preference stage: S-DPO loss by hand, preference data rules, and real TRL DPOTrainer runs (DPO, S-DPO,
iterative rounds, two processes) on a tiny SFT model and Scientific data."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
import yaml

from rlrec.config import from_dict
from rlrec.data.prepared import load_run_data
from rlrec.decoding.inputs import ModelInputs
from rlrec.errors import ConfigError, RlrecError
from rlrec.models import load_model
from rlrec.publish import publish
from rlrec.recipe import Recipe
from rlrec.schema import DPOConfig, NegativesConfig
from rlrec.stages.dpo import run as run_dpo
from rlrec.training.preferences import build_preferences, mine_hard_negatives
from rlrec.training.sdpo import sdpo_loss
from tests.conftest import launch, tiny_recipe

# --- the loss -------------------------------------------------------------------------------------------------------


def test_sdpo_loss_by_hand():
    # r_pos = 0.5, r_neg = (0.2, -0.1), beta = 0.1:
    # margins 0.1 * (0.2 - 0.5) = -0.03 and 0.1 * (-0.1 - 0.5) = -0.06
    # log(exp(-0.03) + exp(-0.06)) = log(0.970446 + 0.941765) = 0.648260
    # -log sigmoid(-0.648260) = log(1 + exp(0.648260)) = log(2.912211) = 1.068912
    loss = sdpo_loss(torch.tensor([0.5]), torch.tensor([[0.2, -0.1]]), beta=0.1)
    assert loss.item() == pytest.approx(1.068912, abs=1e-6)
    by_formula = math.log(1 + math.exp(math.log(math.exp(-0.03) + math.exp(-0.06))))
    assert loss.item() == pytest.approx(by_formula, abs=1e-7)


def test_sdpo_with_one_negative_is_dpo_sigmoid():
    chosen, rejected = torch.randn(16), torch.randn(16)
    dpo = -F.logsigmoid(0.3 * (chosen - rejected))  # TRL's `sigmoid` loss type
    assert torch.allclose(sdpo_loss(chosen, rejected.unsqueeze(1), beta=0.3), dpo, atol=1e-6)


def test_sdpo_loss_grows_with_a_stronger_negative():
    weak = sdpo_loss(torch.tensor([1.0]), torch.tensor([[-1.0, -1.0]]), beta=1.0)
    strong = sdpo_loss(torch.tensor([1.0]), torch.tensor([[-1.0, 2.0]]), beta=1.0)
    assert strong.item() > weak.item()


# --- preference data ------------------------------------------------------------------------------------------------

ITEMS = [f"i{n}" for n in range(50)]


def rows(targets, histories):
    return {"prompt": [f"p{n}" for n in range(len(targets))], "target": targets, "history": histories,
            "user": [f"u{n}" for n in range(len(targets))]}  # fmt: skip


def test_preferences_never_hold_the_target_and_count_what_was_filtered():
    data = rows(["i1", "i2", "i3"], [["i10", "i11"], ["i12"], ["i13", "i14", "i15"]])
    hard = [["i1", "i5", "nope", "i5", "i6"], ["i7", "i2", "i8"], ["i3", "i9"]]  # targets, unknown, repeat
    config = NegativesConfig(hard=2, history=1, random=2)
    records, report = build_preferences(data, ITEMS, Counter({"i0": 9}), config, hard, seed=0)
    assert [r["chosen"] for r in records] == ["i1", "i2", "i3"]
    for record, history in zip(records, data["history"], strict=True):
        assert record["chosen"] not in record["rejected"]
        assert len(record["rejected"]) == 5 and len(set(record["rejected"])) == 5
        assert set(record["rejected"]) <= set(ITEMS)
        assert history[-1] in record["rejected"]  # the most recent history item
    assert records[0]["rejected"][:2] == ["i5", "i6"]
    assert report["target_removed"] >= 3 and report["unknown_removed"] == 1 and report["repeats_removed"] == 1
    assert report["short_prompts"] == 1 and report["filled_random"] == 1  # the third row's beam had one item left
    assert report["prompts"] == 3 and report["dropped_prompts"] == 0


def test_sampled_negatives_skip_the_history_and_popular_follows_counts():
    data = rows(["i1"] * 200, [["i2", "i3"]] * 200)
    popularity = Counter({"i4": 10_000})
    records, report = build_preferences(data, ITEMS, popularity, NegativesConfig(hard=0, popular=3), None, seed=1)
    drawn = Counter(item for r in records for item in r["rejected"])
    assert not {"i1", "i2", "i3"} & set(drawn)
    assert drawn["i4"] == 200  # distinct items per prompt, the popular one almost surely among them
    assert report["short_prompts"] == 0


def test_shortfall_drop_and_error():
    data = rows(["i1", "i2"], [["i3"], ["i4", "i5", "i6"]])
    config = NegativesConfig(hard=0, history=3, on_shortfall="drop")
    records, report = build_preferences(data, ITEMS, Counter(), config, None, seed=0)
    assert [r["chosen"] for r in records] == ["i2"] and report["dropped_prompts"] == 1
    with pytest.raises(RlrecError, match="user u0: found 1 of 3 negatives"):
        build_preferences(data, ITEMS, Counter(), NegativesConfig(hard=0, history=3, on_shortfall="error"), None, 0)


def test_too_small_a_catalogue_is_an_error():
    with pytest.raises(RlrecError, match="too few items"):
        build_preferences(rows(["a"], [[]]), ["a", "b"], Counter(), NegativesConfig(hard=0, random=3), None, 0)


# --- real runs ------------------------------------------------------------------------------------------------------


def dpo_recipe(shared_data, sft_run, tmp_path, **dpo) -> dict:
    shutil.copytree(sft_run / "tiny", tmp_path / "tiny")
    raw = tiny_recipe(shared_data, tmp_path)
    raw["dpo"] = {
        "negatives": {"hard": 2, "random": 1}, "max_train_prompts": 16, "beta": 0.5,
        "train": {"max_steps": 2, "batch_size": 4, "learning_rate": 0.01, "logging_steps": 1, "save_steps": 100,
                  "report_to": []},
        "guard": {"eval_steps": 2, "users": 8, "keep_best": False}, "eval_max_users": 8, **dpo,
    }  # fmt: skip
    return raw


def changed_parameters(before_dir, after_dir) -> int:
    before, _ = load_model(before_dir)
    after, _ = load_model(after_dir)
    return sum(not torch.equal(a, b) for (_, a), (_, b) in
               zip(before.named_parameters(), after.named_parameters(), strict=True))  # fmt: skip


def read_log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sdpo_iterative_rounds_change_the_model(shared_data, sft_run, tmp_path):
    """Two S-DPO rounds with a new LoRA adapter on the full SFT model: the second round mines its negatives with
    the first round's model and trains against it (TRL's "ref" copy of the adapter, identifier rows included).
    With `sft_weight` the target's per-token NLL is added to the S-DPO loss (RPO)."""
    raw = dpo_recipe(shared_data, sft_run, tmp_path, loss="sdpo", rounds=2, finetune="lora", lora={"r": 4, "alpha": 8},
                     sft_weight=0.5)  # fmt: skip
    recipe = from_dict(Recipe, raw)
    metrics = run_dpo(recipe)
    out = recipe.stage_dir("dpo")
    training = metrics["training"]
    assert training["loss"] == "sdpo" and len(training["rounds"]) == 2 and training["global_step"] == 4
    assert [r["init"] for r in training["rounds"]] == [str(recipe.stage_dir("sft") / "model"),
                                                        str(out / "round-1" / "model")]  # fmt: skip
    for summary in training["rounds"]:
        report = summary["negatives"]
        assert report["prompts"] == 16 and report["negatives_per_prompt"] == 3 and summary["rows"] == 16
        assert summary["finetune"] == "lora"
    assert metrics["test"]["metrics"]["valid_rate"] == 1.0
    for index in (1, 2):
        log = read_log(out / f"round-{index}" / "train_log.jsonl")
        first = next(row for row in log if "rewards/chosen" in row)
        # the first step's forward runs before any update: policy and reference agree exactly
        assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
        # -log sigmoid(-log K) with K = 3 negatives, plus 0.5 x the target's NLL per token (logged on its own)
        assert 0.0 < first["sft/nll_chosen"] < 20.0
        assert math.isclose(first["loss"], math.log(1 + 3) + 0.5 * first["sft/nll_chosen"], rel_tol=1e-4)
    assert {row["round"] for row in read_log(out / "train_log.jsonl")} == {1, 2}
    round_one = json.loads((out / "round-1" / "round.json").read_text())
    assert round_one["saved_step"] == 2
    assert (out / "model" / "adapter_config.json").is_file()
    sft = load_model(recipe.stage_dir("sft") / "model")[0]
    first, second = (load_model(out / f"round-{i}" / "model")[0].merge_and_unload() for i in (1, 2))
    for before, after in ((sft, first), (first, second)):  # each round changed the model
        pairs = zip(before.named_parameters(), after.named_parameters(), strict=True)
        assert sum(not torch.equal(a, b) for (_, a), (_, b) in pairs) >= 5


def test_pairwise_dpo_changes_the_full_model(shared_data, sft_run, tmp_path):
    recipe = from_dict(Recipe, dpo_recipe(shared_data, sft_run, tmp_path, loss="dpo", sft_weight=0.1))
    metrics = run_dpo(recipe)
    out = recipe.stage_dir("dpo")
    training = metrics["training"]
    assert training["finetune"] == "full" and training["rounds"][0]["rows"] == 16 * 3  # one pair per negative
    assert changed_parameters(recipe.stage_dir("sft") / "model", out / "model") >= 5
    log = read_log(out / "round-1" / "train_log.jsonl")
    first = next(row for row in log if "rewards/chosen" in row)
    # log 2 from the sigmoid loss at zero margin, plus 0.1 x the target's NLL per token (TRL's `sft` loss type)
    nll_per_token = -first["logps/chosen"] / 5  # 4 semantic-ID tokens (rqvae_zcr index) and the stop token per item
    assert first["rewards/margins"] == 0.0
    assert math.isclose(first["loss"], math.log(2) + 0.1 * nll_per_token, rel_tol=1e-3)
    card = (publish(out, "someone/tiny-dpo", dry_run=True, out=tmp_path / "pub") / "README.md").read_text()
    assert "DPO (beta 0.5, negatives per prompt: 2 hard, 1 random, 1 round," in card
    # a rerun finds the finished round and only re-evaluates
    again = run_dpo(recipe)
    assert again["training"]["steps_run"] == training["steps_run"]
    assert again["test"]["metrics"] == metrics["test"]["metrics"]


def test_hard_negatives_are_catalogue_items_the_model_ranks_high(shared_data, sft_run):
    data = load_run_data(sft_run / "tiny" / "data")
    model, tokenizer = load_model(sft_run / "tiny" / "sft" / "model")
    rows_ = data.rows("train", 12)[:]
    inputs = ModelInputs.build(tokenizer, data.identifiers, data.prompt)
    mined = mine_hard_negatives(model, tokenizer, inputs, rows_, 3, exclude_history=True, batch_size=4)
    assert all(len(items) == 4 and set(items) <= set(data.item_ids) for items in mined)
    assert all(not set(items) & set(history) for items, history in zip(mined, rows_["history"], strict=True))


def test_config_rejects_nonsense():
    with pytest.raises(ConfigError, match="at least one negative"):
        NegativesConfig(hard=0)
    with pytest.raises(ConfigError, match="S-DPO has its own loss"):
        DPOConfig(loss="sdpo", dpo_loss_type=["ipo"])
    with pytest.raises(ConfigError, match="use dpo.sft_weight"):
        DPOConfig(loss="dpo", dpo_loss_type=["sigmoid", "sft"])
    with pytest.raises(ConfigError, match="sft_weight must be >= 0"):
        DPOConfig(sft_weight=-1.0)
    with pytest.raises(ConfigError):
        from_dict(Recipe, {"name": "x", "dpo": {"negative": {"hard": 1}}})


@pytest.mark.distributed
@pytest.mark.slow(reason="two S-DPO processes under accelerate launch: ~12 s")
def test_sdpo_two_cpu_processes(shared_data, sft_run, tmp_path):
    raw = dpo_recipe(shared_data, sft_run, tmp_path, loss="sdpo")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = launch("accelerate_configs/cpu_2proc.yaml", path, module="rlrec.stages.dpo")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2" in result.stdout
    training = json.loads((tmp_path / "tiny" / "dpo" / "metrics.json").read_text())["training"]
    assert training["world_size"] == 2 and training["global_step"] == 2
