"""`rlrec pipeline`: real subprocesses (the CLI, and `accelerate launch` for the training stages) on a tiny synthetic
recipe: a SIGKILL during SFT resumes from the last checkpoint, a re-run skips finished stages, a changed config
re-runs that stage and the ones that need it (the stage graph), never a sibling, and the summary table is written."""

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
from rlrec.recipe import ORDER, PipelineConfig, Recipe, stage_inputs, stage_needs
from rlrec.training.arguments import last_checkpoint
from tests.conftest import RECIPES, REPO, tiny_pipeline

MAX_STEPS = 120


def pipeline_command(recipe_path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "rlrec.cli", "pipeline", "--config", str(recipe_path), *overrides]


def run_pipeline(recipe_path, *overrides: str) -> subprocess.CompletedProcess:
    result = subprocess.run(pipeline_command(recipe_path, *overrides), cwd=REPO, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def changed_keys(raw: dict, edit) -> list[str]:
    recipe = from_dict(Recipe, raw)
    before = stage_keys(recipe, list(ORDER))
    edit(raw)
    after = stage_keys(from_dict(Recipe, raw), list(ORDER))
    return [s for s in ORDER if before[s] != after[s]]


def test_keys_follow_the_stage_graph_not_the_stage_order(tmp_path):
    """A change reruns the stages that read it and those that need them, never a sibling: the quickstart's SASRec
    edit keeps SFT (GRPO reads SASRec through its teacher reward); a GRPO edit keeps SFT, SASRec and a DPO that
    starts from SFT; a DPO that starts from GRPO reruns."""
    raw = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    raw["dpo"] = {}  # init: sft
    assert changed_keys(raw, lambda r: r["sasrec"].update(hidden=32)) == ["sasrec", "grpo", "eval"]
    assert changed_keys(raw, lambda r: r["grpo"].update(beta=0.1)) == ["grpo", "eval"]
    assert changed_keys(raw, lambda r: r["grpo"]["rewards"].pop("teacher")) == ["grpo", "eval"]
    assert changed_keys(raw, lambda r: r["dpo"].update(init="grpo")) == ["dpo", "eval"]
    assert changed_keys(raw, lambda r: r["grpo"].update(beta=0.2)) == ["grpo", "dpo", "eval"]  # dpo now from grpo
    assert changed_keys(raw, lambda r: r["sft"]["train"].update(learning_rate=0.02)) == ["sft", "grpo", "dpo",
                                                                                       "eval"]  # fmt: skip
    assert changed_keys(raw, lambda r: r["data"]["split"].update(max_history=5)) == [
        "data",
        "most_popular",
        "sasrec",
        "sft",
        "grpo",
        "dpo",
        "zero_shot",
        "eval",
    ]  # fmt: skip  (items: the source)
    # the zero-shot row reads the model SFT starts from, not how SFT trains it
    raw["sft"]["model"] = {"path": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    raw["zero_shot"] = {}
    assert "zero_shot" not in changed_keys(raw, lambda r: r["sft"]["train"].update(learning_rate=0.03))
    assert "zero_shot" in changed_keys(raw, lambda r: r["sft"]["model"].update(dtype="bfloat16"))
    # the stage order is a run order of the graph: every stage after the stages it needs, for every recipe
    for path in RECIPES:
        recipe = load_config(Recipe, path)
        for stage in ORDER:
            assert all(ORDER.index(need) < ORDER.index(stage) for need in stage_needs(recipe, stage)), (path, stage)


def test_a_sasrec_edit_keeps_the_sft_checkpoints_resumable(tmp_path):
    """SFT's checkpoint record (stage_inputs) holds only what SFT reads: after a SASRec edit an interrupted SFT
    resumes from its checkpoints; after an SFT edit it refuses them, naming what changed."""
    import torch
    from safetensors.torch import save_file

    raw = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    out = tmp_path / "sft"
    assert last_checkpoint(out, True, stage_inputs(from_dict(Recipe, raw), "sft"), "sft") is None  # records them
    (out / "checkpoints" / "checkpoint-20").mkdir(parents=True)  # then a checkpoint is saved, and the run killed
    (out / "checkpoints" / "checkpoint-20" / "trainer_state.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(out / "checkpoints" / "checkpoint-20" / "model.safetensors"))
    raw["sasrec"]["hidden"] = 32
    found = last_checkpoint(out, True, stage_inputs(from_dict(Recipe, raw), "sft"), "sft")
    assert found is not None and found.endswith("checkpoint-20")
    raw["sft"]["train"]["learning_rate"] = 0.02
    with pytest.raises(ConfigError, match="other inputs.*learning_rate"):
        last_checkpoint(out, True, stage_inputs(from_dict(Recipe, raw), "sft"), "sft")


def test_planned_stages(tmp_path):
    raw = tiny_pipeline(tmp_path)
    recipe = from_dict(Recipe, raw)
    assert recipe.planned_stages() == ["data", "most_popular", "sft", "eval"]
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


@pytest.mark.slow(reason="three runs of a tiny pipeline with SASRec and GRPO through the CLI: ~90 s")
def test_a_finished_pipeline_reruns_only_what_reads_an_edit(tmp_path):
    """Edit `sasrec.*` of a finished pipeline: SFT (and its checkpoints) kept, the GRPO whose teacher reward reads
    SASRec re-run. Edit `grpo.*`: SFT and SASRec kept, GRPO re-run."""
    raw = tiny_pipeline(tmp_path, max_steps=20)
    raw["pipeline"]["launcher"] = "python"
    raw["sasrec"] = {"hidden": 16, "max_len": 5, "max_epochs": 2, "patience": 100, "batch_size": 256, "threads": 1}
    raw["grpo"] = {"num_generations": 4, "prompts_per_device": 2, "max_train_prompts": 8,
                   "rewards": {"hit": 1.0, "teacher": 1.0},
                   "train": {"max_steps": 2, "learning_rate": 0.01, "logging_steps": 1, "save_steps": 100,
                             "report_to": [], "threads": 1},
                   "guard": {"eval_steps": 2, "users": 8}, "eval_splits": []}  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_pipeline(path)
    sft_model = tmp_path / "pipe" / "sft" / "model"
    made = {p: p.stat().st_mtime_ns for p in sft_model.rglob("*") if p.is_file()}

    sasrec_edit = run_pipeline(path, "sasrec.max_epochs=3").stdout
    for kept in ("data", "most_popular", "sft"):
        assert f"{kept}: up to date, skipped" in sasrec_edit, sasrec_edit
    assert "sasrec: inputs changed" in sasrec_edit and "grpo: inputs changed" in sasrec_edit
    assert {p: p.stat().st_mtime_ns for p in sft_model.rglob("*") if p.is_file()} == made  # SFT untouched

    grpo_edit = run_pipeline(path, "sasrec.max_epochs=3", "grpo.beta=0.1").stdout
    for kept in ("data", "most_popular", "sasrec", "sft"):
        assert f"{kept}: up to date, skipped" in grpo_edit, grpo_edit
    assert "grpo: inputs changed" in grpo_edit and "eval: inputs changed" in grpo_edit
    assert json.loads((tmp_path / "pipe" / "grpo" / "metrics.json").read_text())["training"]["global_step"] == 2
