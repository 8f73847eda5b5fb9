"""`rlrec baseline sasrec`: train SASRec (`rlrec.baselines`) with early stopping on valid NDCG@10, then score it
with the harness on the evaluation split.

Writes `runs/<name>/sasrec/`: model.pt, train_log.jsonl (one line per epoch), metrics.json, metrics.md,
config.yaml, manifest.json. While training, `checkpoint.pt` holds the state after the last finished epoch (written
whole, then renamed): a killed run resumes from it, as the training stages resume from their checkpoints, and only
when it was made from the same inputs (seed, data, the sasrec section; `max_epochs`, `patience`, `time_budget_s`
and the evaluation settings may change). It is removed when the stage finishes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from rlrec.baselines import load_sasrec, sasrec_lists, save_sasrec, train_sasrec
from rlrec.data.prepared import RunData, load_run_data
from rlrec.errors import ConfigError
from rlrec.evaluate import eval_rows, score_lists, target_ranks, write_report
from rlrec.recipe import Recipe, stage_inputs
from rlrec.schema import EvalConfig, SASRecConfig
from rlrec.stages.most_popular import baseline_report
from rlrec.stages.runner import Timer, write_outputs
from rlrec.training.arguments import changed_inputs

CHECKPOINT = "checkpoint.pt"
# Settings a resumed SASRec run may change: how long it trains, its threads, how it is evaluated after training.
RESUMABLE = {"max_epochs", "patience", "time_budget_s", "resume", "threads", "eval_batch_size"}


def evaluate(recipe: Recipe, data: RunData, config: EvalConfig, rows) -> dict:
    """Score the run's trained SASRec on `rows`."""
    model = load_sasrec(recipe.stage_dir("sasrec"), recipe.sasrec or SASRecConfig())
    lists = sasrec_lists(model, data, rows, max(config.ks), config.exclude_history)
    targets = rows["target"]
    return {"metrics": score_lists(lists, targets, data, config.ks), "ranks": target_ranks(lists, targets)}


def run(recipe: Recipe) -> dict:
    config = recipe.eval
    sasrec = recipe.sasrec or SASRecConfig()
    timer = Timer()
    data = load_run_data(recipe.stage_dir("data"))
    out = recipe.stage_dir("sasrec")
    out.mkdir(parents=True, exist_ok=True)
    inputs = stage_inputs(recipe, "sasrec")
    state = resume_state(out, inputs, sasrec.resume)
    log_path = out / "train_log.jsonl"
    if state and log_path.is_file():  # epochs logged after the checkpoint are trained again: drop their lines
        kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["epoch"] <= state["epoch"]]
        log_path.write_text("".join(line + "\n" for line in kept))
    with log_path.open("a" if state else "w", encoding="utf-8") as log:

        def save_state(snapshot: dict) -> None:
            log.flush()  # the log holds every epoch the checkpoint holds
            save_checkpoint(out, {**snapshot, "inputs": inputs})

        model, summary = train_sasrec(data, sasrec, recipe.seed, lambda row: log.write(json.dumps(row) + "\n"),
                                      state=state, save_state=save_state)  # fmt: skip
    save_sasrec(model, out)
    (out / CHECKPOINT).unlink(missing_ok=True)
    rows = eval_rows(data, config.split, config, config.max_users)
    result = {**evaluate(recipe, data, config, rows), "training": summary}
    write_report(out, {"sasrec": result}, data, config, rows)
    write_outputs(recipe, "sasrec", [data.path / "dataset"], timer)
    return result


def resume_state(out: Path, inputs: dict, resume: bool) -> dict | None:
    """The state of an interrupted run of the same inputs, or None (no checkpoint, or `resume: false`)."""
    path = out / CHECKPOINT
    if not path.is_file():
        return None
    if not resume:
        print(f"rlrec: sasrec.resume is false: removing {path}", file=sys.stderr)
        path.unlink()
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    changed = changed_inputs(state.get("inputs"), inputs, "sasrec", RESUMABLE)
    if changed:
        raise ConfigError(f"{path} is the checkpoint of a run with other inputs ({changed}); delete it, or set "
                          "sasrec.resume=false to start over")  # fmt: skip
    print(f"rlrec sasrec: resuming after epoch {state['epoch']} (best so far: epoch {state['best_epoch']})",
          file=sys.stderr)  # fmt: skip
    return state


def save_checkpoint(out: Path, state: dict) -> None:
    partial = out / f".{CHECKPOINT}.partial"  # a kill while writing leaves the previous checkpoint whole
    torch.save(state, partial)
    os.replace(partial, out / CHECKPOINT)


def report(recipe: Recipe, result: dict) -> list[str]:
    """What `rlrec baseline sasrec` prints."""
    return [*baseline_report(recipe, "sasrec", result), f"  training: {json.dumps(result['training'])}"]
