"""`rlrec pipeline`: real subprocesses (the CLI, and `accelerate launch` for the training stages) on a tiny synthetic
recipe: a SIGKILL during SFT resumes from the last checkpoint, a re-run skips finished stages, a changed config
re-runs that stage and the ones after it, and the summary table is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from rlrec.config import from_dict, load_config
from rlrec.errors import ConfigError
from rlrec.pipeline import stage_keys
from rlrec.recipe import PipelineConfig, Recipe
from tests.conftest import REPO, tiny_pipeline

MAX_STEPS = 120


def pipeline_command(recipe_path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "rlrec.cli", "pipeline", "--config", str(recipe_path), *overrides]


def run_pipeline(recipe_path, *overrides: str) -> subprocess.CompletedProcess:
    result = subprocess.run(pipeline_command(recipe_path, *overrides), cwd=REPO, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_planned_stages_and_chained_keys(tmp_path):
    raw = tiny_pipeline(tmp_path)
    recipe = from_dict(Recipe, raw)
    assert recipe.planned_stages() == ["data", "most_popular", "sft", "eval"]
    keys = stage_keys(recipe, recipe.planned_stages())
    raw["sft"]["train"]["learning_rate"] = 0.02
    changed = stage_keys(from_dict(Recipe, raw), recipe.planned_stages())
    assert [s for s in keys if keys[s] != changed[s]] == ["sft", "eval"]  # the stage and every one after it
    recipe.pipeline = PipelineConfig(stages=["data", "grpo"])
    with pytest.raises(ConfigError, match="no 'grpo' section"):
        recipe.planned_stages()


@pytest.mark.slow(reason="four pipeline runs through the CLI, one killed mid-SFT: ~45 s")
def test_pipeline_resumes_after_sigkill_skips_finished_stages_and_reruns_changed_ones(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_pipeline(tmp_path, MAX_STEPS)))
    run = tmp_path / "pipe"
    checkpoints = run / "sft" / "checkpoints"

    # 1. Start, and kill the whole process group (pipeline + accelerate launch + trainer) mid-SFT.
    process = subprocess.Popen(pipeline_command(path), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and not (checkpoints / "checkpoint-40" / "trainer_state.json").is_file():
        assert process.poll() is None, process.stdout.read()[-3000:]
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (run / "sft" / "metrics.json").exists()
    done = sorted(int(p.name.split("-")[-1]) for p in checkpoints.glob("checkpoint-*")
                  if (p / "trainer_state.json").is_file())  # fmt: skip
    assert done and done[-1] < MAX_STEPS

    # 2. Re-run: data and most_popular skipped, SFT resumes from its last complete checkpoint and finishes.
    second = run_pipeline(path)
    assert "data: up to date, skipped" in second.stdout and "most_popular: up to date, skipped" in second.stdout
    assert "sft: unfinished run with the same inputs, resuming" in second.stdout
    training = json.loads((run / "sft" / "metrics.json").read_text())["training"]
    resumed_step = int(training["resumed_from"].split("-")[-1])
    assert resumed_step >= done[-1] - 20  # the newest complete one (a later save may have finished after the poll)
    assert training["global_step"] == MAX_STEPS and training["steps_run"] == MAX_STEPS - resumed_step
    summary = (run / "summary.md").read_text()
    assert "| most_popular |" in summary and "| sft |" in summary and "leave_one_out" in summary
    assert summary in second.stdout
    for stage in ("data", "most_popular", "sft", "eval"):
        manifest = json.loads((run / stage / "manifest.json").read_text())
        assert manifest["pipeline_key"] and manifest["versions"]["torch"]

    # 3. Nothing changed: everything skipped, outputs untouched.
    before = (run / "sft" / "metrics.json").stat().st_mtime_ns
    third = run_pipeline(path)
    assert third.stdout.count("up to date, skipped") == 4
    assert (run / "sft" / "metrics.json").stat().st_mtime_ns == before

    # 4. A changed SFT config re-runs SFT from scratch (no stale checkpoint) and the stages after it, not data.
    fourth = run_pipeline(path, "--sft.train.max_steps", "40")
    assert "data: up to date, skipped" in fourth.stdout and "sft: inputs changed" in fourth.stdout
    assert "eval: inputs changed" in fourth.stdout
    training = json.loads((run / "sft" / "metrics.json").read_text())["training"]
    assert training["resumed_from"] is None and training["global_step"] == 40 and training["steps_run"] == 40
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["sft"]["train"]["max_steps"] == 40


def test_every_shipped_recipe_parses_and_plans():
    paths = sorted((REPO / "recipes").rglob("*.yaml"))
    assert REPO / "recipes" / "quickstart.yaml" in paths
    for path in paths:
        recipe = load_config(Recipe, path)
        assert recipe.planned_stages()[0] in ("items", "data"), path
    demo = load_config(Recipe, REPO / "recipes" / "quickstart.yaml")
    assert demo.planned_stages() == ["items", "data", "most_popular", "sasrec", "sft", "grpo", "eval"]
