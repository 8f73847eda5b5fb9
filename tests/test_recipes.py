"""Every shipped recipe parses strictly: a recipe that rots fails here, not in a user's shell."""

from __future__ import annotations

import pytest

from rlrec.config import load_config
from rlrec.recipe import Recipe
from tests.conftest import REPO

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 4


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_recipe_parses_strictly_and_names_its_command(path):
    recipe = load_config(Recipe, path)
    assert recipe.name
    header = path.read_text().splitlines()[:6]
    assert any(line.startswith("# Launch:") for line in header), "a recipe states its launch command in its header"
