"""Shared fixtures and helpers. Real data comes from $RLREC_SHARED_DATA (default ../shared/data); a test that needs
it fails when it is missing, never skips: CI must not go green on a machine without the data.

Tiers: `make test` runs everything not marked `slow` (the fast tier); `make test-all` (what CI runs) runs all.
A test is `slow` when it takes tens of seconds on two cores (a real encoder over a whole catalogue, several
processes, a SIGKILLed pipeline); its marker says why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlrec.config import from_dict
from rlrec.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]
# every shipped recipe (the ablation grids beside them are grids, parsed in test_grpo)
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if p.parent.name not in ("ablations", "tune"))
TUNE_SPACES = sorted((REPO / "recipes").rglob("tune/*.yaml"))


def pytest_collection_modifyitems(config, items) -> None:
    """Every `slow` test says why it is slow: `@pytest.mark.slow(reason="...")`."""
    missing = [
        item.nodeid for item in items if (mark := item.get_closest_marker("slow")) and not mark.kwargs.get("reason")
    ]
    if missing:
        raise pytest.UsageError(f"slow tests without a reason: {missing}")


def shared_data_root() -> Path:
    return Path(os.environ.get("RLREC_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_root()
    if not (root / "movielens-100k" / "u.data").is_file():
        pytest.fail(f"shared data not found at {root}: set RLREC_SHARED_DATA to the folder of ../shared/data")
    return root


def minionerec_copy(shared_data: Path, out: Path) -> tuple[Path, Path]:
    """A writable copy of the shared MiniOneRec export (the shared files are read-only): (its root, its valid CSV)."""
    root = out / "mini"
    shutil.copytree(shared_data / "minionerec-industrial", root)
    (root / "valid").chmod(0o755)
    csv = next((root / "valid").glob("*.csv"))
    csv.chmod(0o644)
    return root, csv


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "rlrec.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def launch(config: str, recipe_path, *extra: str, module: str = "rlrec.stages.sft") -> subprocess.CompletedProcess:
    """`accelerate launch --config_file <config> -m <module> --config <recipe>` in a subprocess."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / config), *extra,
               "-m", module, "--config", str(recipe_path)]  # fmt: skip
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


# --- a tiny run on real Scientific data (SFT, GRPO, DPO tests) --------------------------------------------------------


def tiny_recipe(shared_data, out, name="tiny", **sft) -> dict:
    sci = shared_data / "amazon18-scientific"
    return {
        "name": name, "output_dir": str(out), "seed": 0,
        "data": {
            "source": {"format": "lcrec", "path": str(sci),
                       "index_path": str(sci / "indexes/rqvae_zcr/Scientific.index.json")},
            "split": {"method": "leave_one_out", "max_history": 5},
            "prompt": {"identifier": "sid"},
        },
        "sft": {
            "model": {"hidden_size": 32, "layers": 1, "heads": 2},
            "train": {"max_steps": 4, "batch_size": 4, "logging_steps": 1, "save_steps": 2, "report_to": [],
                      "learning_rate": 0.01},
            "max_length": 128, "eval_splits": ["test"], "eval_max_users": 8, "max_train_rows": 512, **sft,
        },
        "eval": {"ks": [1, 5, 10], "batch_size": 8},
    }  # fmt: skip


def grpo_recipe(shared_data, sft_run, tmp_path, **grpo) -> dict:
    """tiny_recipe with a copy of the session's tiny SFT run and a GRPO section of 3 steps (overrides in `grpo`)."""
    shutil.copytree(sft_run / "tiny", tmp_path / "tiny")
    raw = tiny_recipe(shared_data, tmp_path)
    raw["grpo"] = {
        "num_generations": 4, "prompts_per_device": 2, "max_train_prompts": 64,
        "rewards": {"hit": 1.0, "rank_penalty": 1.0},
        "train": {"max_steps": 3, "learning_rate": 0.01, "logging_steps": 1, "save_steps": 100, "report_to": []},
        "guard": {"eval_steps": 2, "users": 8, "keep_best": False},
        "eval_max_users": 8, **grpo,
    }  # fmt: skip
    return raw


@pytest.fixture(scope="session")
def prepared(shared_data, tmp_path_factory):
    """Prepared Scientific data (leave-one-out, ready SIDs), copied into each test's run folder."""
    from rlrec.stages import data

    out = tmp_path_factory.mktemp("prepared")
    data.run(from_dict(Recipe, tiny_recipe(shared_data, out)))
    return out / "tiny" / "data"


def recipe_with_data(shared_data, prepared, tmp_path, name="tiny", **sft) -> Recipe:
    recipe = from_dict(Recipe, tiny_recipe(shared_data, tmp_path, name, **sft))
    shutil.copytree(prepared, recipe.stage_dir("data"))
    return recipe


@pytest.fixture(scope="session")
def sft_run(shared_data, prepared, tmp_path_factory):
    """A tiny SFT model (4 steps) on prepared Scientific data: <out>/tiny/{data,sft}, for the post-training tests."""
    from rlrec.stages import sft

    out = tmp_path_factory.mktemp("sft_run")
    sft.run(recipe_with_data(shared_data, prepared, out))
    return out


# --- a tiny synthetic pipeline (pipeline and publishing tests) --------------------------------------------------------


def tiny_pipeline(out, max_steps: int = 120) -> dict:
    return {
        "name": "pipe", "output_dir": str(out), "seed": 0,
        "data": {"source": {"format": "synthetic",
                            "synthetic": {"num_users": 150, "num_items": 40, "num_categories": 4, "seed": 0}},
                 "split": {"method": "leave_one_out", "max_history": 5}, "prompt": {"identifier": "id"}},
        "sft": {"model": {"hidden_size": 16, "layers": 1, "heads": 1},
                "train": {"max_steps": max_steps, "batch_size": 8, "logging_steps": 10, "save_steps": 20,
                          "report_to": [], "learning_rate": 0.01, "threads": 1},
                "max_length": 64, "eval_splits": ["test"]},
        "eval": {"ks": [1, 5, 10], "batch_size": 50},
        "pipeline": {"accelerate_config": str(REPO / "accelerate_configs/single.yaml")},
    }  # fmt: skip
