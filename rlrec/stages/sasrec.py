"""`rlrec baseline sasrec`: train SASRec (`rlrec.baselines`) with early stopping on valid NDCG@10, then score it
with the harness on the evaluation split.

Writes `runs/<name>/sasrec/`: model.pt, train_log.jsonl (one line per epoch), metrics.json, metrics.md,
config.yaml, manifest.json.
"""

from __future__ import annotations

import json

from rlrec.baselines import load_sasrec, sasrec_lists, save_sasrec, train_sasrec
from rlrec.data.prepared import RunData, load_run_data
from rlrec.evaluate import score_lists, write_report
from rlrec.recipe import Recipe
from rlrec.schema import EvalConfig, SASRecConfig
from rlrec.stages.most_popular import baseline_report
from rlrec.stages.runner import Timer, write_outputs


def evaluate(recipe: Recipe, data: RunData, config: EvalConfig, rows) -> dict:
    """Score the run's trained SASRec on `rows`."""
    model = load_sasrec(recipe.stage_dir("sasrec"), recipe.sasrec or SASRecConfig())
    lists = sasrec_lists(model, data, rows, max(config.ks), config.exclude_history)
    return {"metrics": score_lists(lists, rows["target"], data, config.ks)}


def run(recipe: Recipe) -> dict:
    config = recipe.eval or EvalConfig()
    sasrec = recipe.sasrec or SASRecConfig()
    timer = Timer()
    data = load_run_data(recipe.stage_dir("data"))
    out = recipe.stage_dir("sasrec")
    out.mkdir(parents=True, exist_ok=True)
    with (out / "train_log.jsonl").open("w", encoding="utf-8") as log:
        model, summary = train_sasrec(data, sasrec, recipe.seed, lambda row: log.write(json.dumps(row) + "\n"))
    save_sasrec(model, out)
    rows = data.rows(config.split, config.max_users)
    lists = sasrec_lists(model, data, rows, max(config.ks), config.exclude_history)
    result = {"metrics": score_lists(lists, rows["target"], data, config.ks), "training": summary}
    write_report(out, {"sasrec": result}, data, config, {"num_users": len(rows)})
    write_outputs(recipe, "sasrec", [data.path / "dataset"], timer)
    return result


def report(recipe: Recipe, result: dict) -> list[str]:
    """What `rlrec baseline sasrec` prints."""
    return [*baseline_report(recipe, "sasrec", result), f"  training: {json.dumps(result['training'])}"]
