"""Every shipped recipe parses strictly: a recipe that rots fails here, not in a user's shell."""

from __future__ import annotations

import dataclasses

import pytest

from rlrec.config import load_config
from rlrec.recipe import Recipe
from rlrec.rewards import resolve
from tests.conftest import RECIPES, REPO


def test_there_are_recipes():
    assert len(RECIPES) >= 4 and REPO / "recipes" / "quickstart.yaml" in RECIPES
    demo = load_config(Recipe, REPO / "recipes" / "quickstart.yaml")
    assert demo.planned_stages() == ["items", "data", "most_popular", "sasrec", "sft", "grpo", "eval"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_recipe_parses_plans_and_names_its_command(path):
    """Strict parsing, a plan whose every stage has its section (planned_stages raises otherwise), reward names
    that resolve (a typo fails here, not after a model load), and the launch command in the header."""
    recipe = load_config(Recipe, path)
    assert recipe.planned_stages()[0] in ("items", "data")
    for reward in recipe.grpo.rewards if recipe.grpo else {}:
        resolve(reward)
    header = path.read_text().splitlines()[:6]
    assert any(line.startswith("# Launch:") for line in header), "a recipe states its launch command in its header"


SCRATCH = [("movielens-100k", "scratch_title"), ("amazon18-scientific", "scratch_id")]


@pytest.mark.parametrize("dataset, scratch", SCRATCH)
def test_from_scratch_comparison_shares_the_pretrained_recipes_data_and_evaluation(dataset, scratch):
    """The from-scratch row of smollm2_title.yaml's table: the same prepared data, prompt template and evaluated
    users, so its SFT row pairs with every SmolLM2 row and baseline; only the model differs (and on Scientific the
    identifiers: item ids, as its header says why)."""
    pretrained = load_config(Recipe, REPO / "recipes" / dataset / "smollm2_title.yaml")
    scratch = load_config(Recipe, REPO / "recipes" / dataset / f"{scratch}.yaml")
    assert (scratch.data.source, scratch.data.split) == (pretrained.data.source, pretrained.data.split)
    same_prompt = dataclasses.replace(scratch.data.prompt, identifier=pretrained.data.prompt.identifier)
    assert same_prompt == pretrained.data.prompt
    assert (scratch.eval.users, scratch.eval.seed, scratch.eval.ks, scratch.eval.beam_width) == (
        pretrained.eval.users, pretrained.eval.seed, pretrained.eval.ks, pretrained.eval.beam_width)  # fmt: skip
    assert pretrained.sft.model.path.endswith(".gguf") and scratch.sft.model.from_scratch
