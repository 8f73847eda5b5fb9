"""The harness's promises for tables of a pretrained model: every system of a run is scored on the same seeded
sample of users, each evaluation leaves per-user ranks that reproduce its metrics (the paired intervals of
docs/results.md are computed from them), the cold-item slice is the users whose target is rare in training, and
the zero-shot row is the untrained pretrained model, scored like a trained stage."""

from __future__ import annotations

import json

import pytest

from rlrec.config import from_dict
from rlrec.data.prepared import load_run_data
from rlrec.errors import ConfigError
from rlrec.evaluate import read_ranks
from rlrec.metrics import COLD_MAX_COUNT, hit_at_k, ndcg_at_k
from rlrec.models import build_for_training
from rlrec.recipe import Recipe
from rlrec.schema import EvalConfig, ModelConfig
from rlrec.stages import data as data_stage
from rlrec.stages import most_popular, sft, zero_shot
from tests.conftest import tiny_pipeline


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory):
    """A synthetic run whose `sft.model.path` is a saved (random) model folder, evaluated on 40 sampled test users:
    most-popular, the zero-shot model, and SFT with LoRA on it."""
    out = tmp_path_factory.mktemp("sampled")
    raw = tiny_pipeline(out, max_steps=4)
    raw["eval"].update(users=40, seed=3)
    recipe = from_dict(Recipe, raw)
    data_stage.run(recipe)
    data = load_run_data(recipe.stage_dir("data"))
    texts = [m["content"] for m in data.rows("train")[0]["prompt"]]
    model, tokenizer, _ = build_for_training(ModelConfig(hidden_size=16, layers=1, heads=1), data.identifiers, texts,
                                             seed=0)  # fmt: skip
    model.save_pretrained(out / "pretrained")
    tokenizer.save_pretrained(out / "pretrained")
    raw["sft"]["model"] = {"path": str(out / "pretrained")}
    raw["sft"]["lora"] = {"r": 4, "alpha": 8}
    raw["zero_shot"] = {}
    recipe = from_dict(Recipe, raw)
    most_popular.run(recipe)
    zero_shot.run(recipe)
    sft.run(recipe)
    return recipe, data


def test_every_system_is_scored_on_the_same_sampled_users(sampled_run):
    recipe, data = sampled_run
    expected = list(data.sample("test", 40, seed=3)["user"])
    assert expected != list(data.rows("test")["user"])[:40]  # a sample of the split, not its first rows
    for stage in ("most_popular", "zero_shot", "sft"):
        users, ranks = read_ranks(recipe.stage_dir(stage))
        assert users == expected, stage
        payload = json.loads((recipe.stage_dir(stage) / "metrics.json").read_text())
        assert payload["protocol"]["users_sample"] == 40 and payload["protocol"]["users_seed"] == 3
        metrics = payload["results"]["most-popular"]["metrics"] if stage == "most_popular" else payload["test"][
            "metrics"]  # fmt: skip
        (system_ranks,) = ranks.values()
        assert len(system_ranks) == 40
        # the ranks reproduce the metrics: a paired comparison from ranks.json is of the systems in the table
        assert metrics["hr@10"] == pytest.approx(sum(hit_at_k(r, 10) for r in system_ranks) / 40, abs=1e-6)
        assert metrics["ndcg@10"] == pytest.approx(sum(ndcg_at_k(r, 10) for r in system_ranks) / 40, abs=1e-6)
        targets = json.loads((recipe.stage_dir(stage) / "ranks.json").read_text())["test"]["targets"]
        cold = [r for r, t in zip(system_ranks, targets, strict=True) if data.popularity.get(t, 0) <= COLD_MAX_COUNT]
        assert metrics["cold_users"] == len(cold)
        if cold:
            assert metrics["cold_hr@10"] == pytest.approx(sum(hit_at_k(r, 10) for r in cold) / len(cold), abs=1e-6)


def test_zero_shot_is_the_untrained_model(sampled_run):
    """The zero-shot row scores the pretrained folder as it is (its evaluation says so), and SFT moved away from it."""
    recipe, _ = sampled_run
    shot = json.loads((recipe.stage_dir("zero_shot") / "metrics.json").read_text())
    assert shot["training"]["model"] == recipe.sft.model.path and shot["test"]["metrics"]["valid_rate"] == 1.0
    trained = json.loads((recipe.stage_dir("sft") / "metrics.json").read_text())
    assert trained["test"]["metrics"] != shot["test"]["metrics"]
    assert not (recipe.stage_dir("zero_shot") / "model").exists()  # nothing trained, nothing saved


def test_zero_shot_needs_a_pretrained_model_and_users_a_positive_count(tmp_path):
    raw = tiny_pipeline(tmp_path)
    raw["zero_shot"] = {}
    with pytest.raises(ConfigError, match="zero_shot scores a pretrained model"):
        zero_shot.run(from_dict(Recipe, raw))
    with pytest.raises(ConfigError, match="eval.users must be >= 1"):
        EvalConfig(users=0)
