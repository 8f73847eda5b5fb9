"""`rlrec tune`: the space is checked before any trial runs, and a real study of SFT trials (each a process, as
`rlrec pipeline` runs it) selects on the validation guard only, prunes a trial below the median, writes the best
recipe with its study in the header, and resumes from its SQLite storage."""

from __future__ import annotations

import json

import pytest
import yaml

from rlrec.config import load_config
from rlrec.errors import ConfigError
from rlrec.recipe import Recipe
from rlrec.tune import TuneSpace, parse_budget, run_tune, with_values
from tests.conftest import REPO, TUNE_SPACES, run_cli, tiny_pipeline


def write(path, payload) -> str:
    path.write_text(yaml.safe_dump(payload))
    return str(path)


def tune_recipe(tmp_path) -> str:
    raw = tiny_pipeline(tmp_path, max_steps=200)
    raw["sft"]["select"] = {"eval_steps": 20, "users": None, "patience": 0}
    raw["pipeline"]["launcher"] = "python"
    return write(tmp_path / "recipe.yaml", raw)


def test_budgets_and_spaces_are_checked_before_any_trial(tmp_path):
    assert parse_budget("20") == ("trials", 20) and parse_budget("3600s") == ("cpu_seconds", 3600.0)
    for bad in ("0", "-5s", "ten", "1.5"):
        with pytest.raises(ConfigError, match="--budget"):
            parse_budget(bad)
    with pytest.raises(ConfigError, match="searches sft.\\* keys only"):
        load_config(
            TuneSpace, write(tmp_path / "s.yaml", {"stage": "sft", "params": {"grpo.beta": {"low": 0.01, "high": 0.1}}})
        )
    with pytest.raises(ConfigError, match="low < high"):
        load_config(
            TuneSpace,
            write(
                tmp_path / "s.yaml", {"stage": "sft", "params": {"sft.train.learning_rate": {"low": 0.1, "high": 0.01}}}
            ),
        )
    recipe = tune_recipe(tmp_path)
    typo = write(
        tmp_path / "typo.yaml", {"stage": "sft", "params": {"sft.train.learnin_rate": {"low": 1e-4, "high": 1e-2}}}
    )
    result = run_cli("tune", "--config", recipe, "--space", typo, "--budget", "3")
    assert result.returncode == 2 and "learnin_rate" in result.stderr and "learning_rate" in result.stderr
    assert not (tmp_path / "pipe" / "tune").exists()  # refused before the pipeline or a trial ran


@pytest.mark.slow(reason="a real study: three SFT trials, each a process of about 15 s, then a resumed fourth")
def test_a_study_selects_on_validation_prunes_and_resumes(tmp_path):
    recipe = tune_recipe(tmp_path)
    space = write(tmp_path / "lr.yaml", {
        "stage": "sft",
        "params": {"sft.train.learning_rate": {"low": 1e-7, "high": 0.05, "log": True}},
        "enqueue": [{"sft.train.learning_rate": 1e-7}],  # trial 1: a rate that learns nothing, to be pruned
        "sampler": {"seed": 0, "startup_trials": 2},
        "pruner": {"startup_trials": 1, "warmup_evaluations": 1},
    })  # fmt: skip
    summary = run_tune(recipe, space, "3")
    out = tmp_path / "pipe" / "tune" / "lr"
    rows = {r["trial"]: r for r in (dict(zip(("trial", "state", "value"), line.split(",")[:3], strict=True))
                                    for line in (out / "trials.csv").read_text().splitlines()[1:])}  # fmt: skip
    assert summary["trials"] == 3 and set(rows) == {"0", "1", "2"}
    trials = {t: yaml.safe_load((out / "trials" / f"t00{t}" / "recipe.yaml").read_text()) for t in range(3)}
    assert trials[0]["sft"]["train"]["learning_rate"] == 0.01  # trial 0: the recipe's own value
    assert trials[1]["sft"]["train"]["learning_rate"] == 1e-7 and rows["1"]["state"] == "pruned"
    for t in range(3):  # no trial scored test: the objective is the guard's validation
        assert trials[t]["sft"]["eval_splits"] == []
        metrics = out / "trials" / f"t00{t}" / "sft" / "metrics.json"
        assert not metrics.is_file() or "test" not in json.loads(metrics.read_text())
    best = summary["best"]
    guard = [json.loads(line) for line in (out / "trials" / f"t00{best['number']}" / "sft" / "guard.jsonl")
             .read_text().splitlines()]  # fmt: skip
    assert best["value"] == max(entry["ndcg@10"] for entry in guard)
    text = (out / "best.yaml").read_text()
    assert text.startswith("# Tuned by `rlrec tune") and "Chosen on validation only" in text
    tuned = load_config(Recipe, out / "best.yaml")
    assert tuned.sft.train.learning_rate == best["params"]["sft.train.learning_rate"] and tuned.name == "pipe"
    assert (out / "trials.png").is_file() and "| trial | state |" in (out / "trials.md").read_text()
    again = run_tune(recipe, space, "4")  # the study resumes: one more trial, not four
    assert again["trials"] == 4 and (out / "trials" / "t003").is_dir() and not (out / "trials" / "t004").exists()


@pytest.mark.parametrize("path", TUNE_SPACES, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_spaces_parse_and_every_value_is_a_valid_recipe_value(path):
    space = load_config(TuneSpace, path)
    recipe = load_config(Recipe, REPO / space.recipe)
    recipe.section(space.stage)
    for key, param in space.params.items():
        for value in param.choices if param.choices is not None else [param.low, param.high]:
            with_values(recipe, {key: value})
    assert any(line.startswith("# Launch: rlrec tune") for line in path.read_text().splitlines()[:4])


def test_there_are_tune_spaces():
    assert {p.parent.parent.name for p in TUNE_SPACES} >= {"movielens-100k", "amazon18-scientific",
                                                          "minionerec-industrial"}  # fmt: skip
