"""The second reliability pass (issue 30): one owner per run folder, stages that die with their pipeline, inputs
keyed by their content, checkpoints that fall back past a truncated one, numbers refused with their key and range,
and errors that name the file. Each test states the behaviour it replaces."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from rlrec.config import from_dict, load_config
from rlrec.errors import ConfigError, DataError, RlrecError
from rlrec.ownership import LOCK_ENV, LOCK_FILE, hold_run
from rlrec.pipeline import stage_keys
from rlrec.recipe import Recipe, stage_inputs
from rlrec.training.arguments import last_checkpoint
from tests.conftest import REPO, minionerec_copy, run_cli, tiny_pipeline

# --- one process per run folder ---------------------------------------------------------------------------------------


def test_a_second_process_on_a_run_is_refused_and_a_dead_owner_is_taken_over(tmp_path, capsys, monkeypatch):
    """Before: no lock; two `rlrec sft` on one run, and one ended in a traceback after the other's checkpoint
    rotation deleted its folder."""
    monkeypatch.delenv(LOCK_ENV, raising=False)
    run = tmp_path / "run"
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run.mkdir()
        (run / LOCK_FILE).write_text(
            json.dumps(
                {
                    "pid": owner.pid,
                    "host": os.uname().nodename,
                    "command": "rlrec sft --config x.yaml",
                    "started": "now",
                }
            )
        )
        with pytest.raises(RlrecError, match=f"in use by PID {owner.pid}.*rlrec sft --config x.yaml"):
            with hold_run(run, "rlrec sft"):
                pass
    finally:
        owner.kill()
        owner.wait()
    with hold_run(run, "rlrec grpo"):  # the owner is gone: taken over, with a line
        held = json.loads((run / LOCK_FILE).read_text())
        assert held["pid"] == os.getpid() and held["command"] == "rlrec grpo"
        assert os.environ[LOCK_ENV] == str((run / LOCK_FILE).resolve())  # what the stage processes inherit
        with hold_run(run, "child"):  # a child of the owner runs under its lock
            pass
    assert f"taking over the lock of PID {owner.pid}" in capsys.readouterr().err
    assert not (run / LOCK_FILE).exists() and LOCK_ENV not in os.environ


def test_the_cli_refuses_a_busy_run_before_it_trains(tmp_path):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(tiny_pipeline(tmp_path)))
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / LOCK_FILE).write_text(
        json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "command": "rlrec pipeline", "started": "now"})
    )
    env = {k: v for k, v in os.environ.items() if k != LOCK_ENV}
    result = subprocess.run([sys.executable, "-m", "rlrec.cli", "data", "prepare", "--config", str(recipe_file)],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert result.returncode == 2 and f"in use by PID {os.getpid()}" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "pipe" / "data").exists()


@pytest.mark.slow(reason="a real pipeline trains SFT in a child process for about 20 s before it is killed")
def test_kill_9_of_the_pipeline_leaves_no_trainer_and_the_rerun_trains_once(tmp_path):
    """Before: `kill -9` of `rlrec pipeline` left its training child running, re-parented, still writing
    checkpoints; the rerun resumed the same folder with a second trainer."""
    raw = tiny_pipeline(tmp_path, max_steps=4000)
    raw["pipeline"]["launcher"] = "python"
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k != LOCK_ENV}
    pipeline = subprocess.Popen([sys.executable, "-m", "rlrec.cli", "pipeline", "--config", str(recipe_file)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)  # fmt: skip
    checkpoints = tmp_path / "pipe" / "sft" / "checkpoints"
    deadline = time.time() + 240
    while not any(checkpoints.glob("checkpoint-*")) and time.time() < deadline:
        time.sleep(0.5)
    assert any(checkpoints.glob("checkpoint-*")), "SFT never saved a checkpoint"
    trainers = psutil.Process(pipeline.pid).children(recursive=True)
    assert trainers
    pipeline.send_signal(signal.SIGKILL)
    pipeline.wait()
    gone, alive = psutil.wait_procs(trainers, timeout=30)
    assert not alive, f"still running after the pipeline was killed: {[p.cmdline() for p in alive]}"
    raw["sft"]["train"]["max_steps"] = 60  # the rerun: same inputs apart from the length, which resumes
    recipe_file.write_text(yaml.safe_dump(raw))
    rerun = subprocess.run([sys.executable, "-m", "rlrec.cli", "sft", "--config", str(recipe_file)], cwd=REPO,
                           capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count("world size") == 1  # one trainer, in this process
    assert (tmp_path / "pipe" / "sft" / "model" / "model.safetensors").is_file()


# --- inputs keyed by their content ------------------------------------------------------------------------------------


def generic_recipe(tmp_path) -> Recipe:
    rows = ["user_id,item_id,timestamp", *(f"u{u},i{(u + t) % 7},{t}" for u in range(12) for t in range(6))]
    (tmp_path / "events.csv").write_text("\n".join(rows) + "\n")
    raw = tiny_pipeline(tmp_path)
    raw["data"]["source"] = {"format": "generic", "path": str(tmp_path / "events.csv")}
    raw["sasrec"] = {"max_epochs": 1}
    return from_dict(Recipe, raw)


def test_editing_the_interactions_file_changes_the_keys_of_every_stage_that_reads_it(tmp_path):
    """Before: keys covered recipe sections only; after an in-place edit `rlrec pipeline` skipped every stage
    ("data: up to date") and `rlrec sft` resumed the old data's checkpoint."""
    recipe = generic_recipe(tmp_path)
    stages = ["data", "sasrec", "sft"]
    before = stage_keys(recipe, stages)
    assert stage_keys(recipe, stages) == before  # deterministic
    with (tmp_path / "events.csv").open("a") as handle:
        handle.write("u0,i3,99\n")
    after = stage_keys(recipe, stages)
    assert all(before[s] != after[s] for s in stages)
    record = stage_inputs(recipe, "sft")["needs"]["data"]["files"]
    assert list(record) == ["data.source.path"] and str(tmp_path / "events.csv") in record["data.source.path"]


def test_a_resume_across_an_edited_file_is_refused_naming_the_file(tmp_path):
    recipe = generic_recipe(tmp_path)
    out = tmp_path / "stage"
    last_checkpoint(out, True, stage_inputs(recipe, "sft"), "sft")  # records the inputs
    (out / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (tmp_path / "events.csv").write_text((tmp_path / "events.csv").read_text() + "u1,i2,99\n")
    with pytest.raises(ConfigError, match=r"needs\.data\.files\.data\.source\.path: .*events\.csv"):
        last_checkpoint(out, True, stage_inputs(recipe, "sft"), "sft")


def test_a_truncated_last_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    """Before: a truncated `model.safetensors` in the newest checkpoint ended the resumed run in a traceback."""
    import torch
    from safetensors.torch import save_file

    out = tmp_path / "stage"
    last_checkpoint(out, True, {"stage": "sft"}, "sft")  # records the inputs
    for step in (2, 4):
        folder = out / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file({"w": torch.ones(64, 64)}, str(folder / "model.safetensors"))
        (folder / "trainer_state.json").write_text("{}")
    newest = out / "checkpoints" / "checkpoint-4" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:5000])
    assert last_checkpoint(out, True, {"stage": "sft"}, "sft") == str(out / "checkpoints" / "checkpoint-2")
    assert "truncated" in capsys.readouterr().err


# --- numbers, text and files refused with what was expected -----------------------------------------------------------


@pytest.mark.parametrize(("override", "message"), [
    ("sft.train.learning_rate=.inf", "key 'sft.train.learning_rate': expected a finite number, got inf"),
    ("sft.train.learning_rate=.nan", "key 'sft.train.learning_rate': expected a finite number, got nan"),
    ("seed=-1", "key 'seed': expected a seed >= 0, got -1"),
    ("eval.seed=-3", "key 'eval.seed': expected a seed >= 0, got -3"),
    ("grpo.max_train_prompts=0", "key 'grpo.max_train_prompts': expected an integer >= 1, or null"),
    ("sft.max_train_rows=0", "key 'sft.max_train_rows': expected an integer >= 1, or null"),
    ("eval.beam_width=0", "key 'eval.beam_width': expected an integer >= 1, or null"),
])  # fmt: skip
def test_numbers_that_would_break_later_are_refused_with_key_and_range(override, message):
    """Before: .inf trained a NaN model and exited 0; .nan and a negative seed ended in tracebacks;
    `grpo.max_train_prompts 0` meant "all"; `sft.max_train_rows 0` was a bare StopIteration."""
    with pytest.raises(ConfigError, match="^.*" + message.replace("(", r"\(").replace(".", r"\.")):
        load_config(Recipe, REPO / "recipes" / "quickstart.yaml", [override])


def test_a_recipe_that_is_not_utf8_is_named_with_its_line(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"name: x\nseed: 0  # caf\xe9\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml:2: not UTF-8 text \(byte 0xe9"):
        load_config(Recipe, path)


def test_an_empty_minionerec_csv_is_named(shared_data, tmp_path):
    """Before: "missing column(s) ...; have None"."""
    from rlrec.data import read_source
    from rlrec.schema import SourceConfig

    root, valid = minionerec_copy(shared_data, tmp_path)
    valid.write_text("")
    with pytest.raises(DataError, match=f"{valid}: empty file; expected a CSV with the header"):
        read_source(SourceConfig(format="minionerec", path=str(root)))


def test_eval_without_a_trained_model_says_so(tmp_path):
    """Before: exit 0 with the baselines only, and no word that the model was missing."""
    raw = tiny_pipeline(tmp_path)
    recipe_file = tmp_path / "recipe.yaml"
    raw["eval"]["baselines"] = ["most_popular"]
    recipe_file.write_text(yaml.safe_dump(raw))
    assert run_cli("data", "prepare", "--config", str(recipe_file)).returncode == 0
    result = run_cli("eval", "--config", str(recipe_file))
    assert result.returncode == 0 and "has no trained model yet" in result.stderr, result.stderr[-2000:]
    assert "most-popular" in result.stdout
    raw["eval"]["baselines"] = []
    recipe_file.write_text(yaml.safe_dump(raw))
    result = run_cli("eval", "--config", str(recipe_file))
    assert result.returncode == 2 and "nothing to evaluate" in result.stderr


def test_a_full_disk_names_the_run_it_was_writing(tmp_path, capsys, monkeypatch):
    """Before: a full disk while writing an open file was a traceback with no path."""
    import errno

    from rlrec.errors import run_reporting_errors

    monkeypatch.delenv(LOCK_ENV, raising=False)

    def command() -> None:
        with hold_run(tmp_path / "run", "rlrec sft"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    assert run_reporting_errors(command) == 2
    assert capsys.readouterr().err.strip() == f"rlrec: error: {tmp_path / 'run'}: No space left on device"


def test_the_data_stage_replaces_only_its_own_folder(tmp_path):
    """Before: `runs/<name>/data` was removed whatever it held, the interactions file given inside it included."""
    from rlrec.stages import data

    recipe = generic_recipe(tmp_path)
    folder = recipe.stage_dir("data")
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(RlrecError, match="not written by rlrec"):
        data.run(recipe)
    assert (folder / "notes.txt").read_text() == "mine"
    (folder / "notes.txt").unlink()
    data.run(recipe)
    data.run(recipe)  # its own folder: replaced
    assert (folder / "catalog.jsonl").is_file()
    inside = folder / "events.csv"
    inside.write_text((tmp_path / "events.csv").read_text())
    raw = tiny_pipeline(tmp_path)
    raw["data"]["source"] = {"format": "generic", "path": str(inside)}
    with pytest.raises(RlrecError, match="overlaps the input"):
        data.run(from_dict(Recipe, raw))
    assert inside.is_file()
