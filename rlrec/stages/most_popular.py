"""`rlrec baseline most_popular`: rank every item by its training popularity, scored by the harness.

Writes `runs/<name>/most_popular/`: metrics.json (protocol + numbers), metrics.md, config.yaml, manifest.json.
"""

from __future__ import annotations

from rlrec.baselines import most_popular_lists
from rlrec.data.prepared import RunData, load_run_data
from rlrec.evaluate import eval_rows, score_lists, target_ranks, write_report
from rlrec.recipe import Recipe
from rlrec.schema import EvalConfig
from rlrec.stages.runner import Timer, write_outputs


def evaluate(data: RunData, config: EvalConfig, rows) -> dict:
    """Score most-popular on `rows` (under `exclude_history`, each user's history is left out of their list)."""
    exclude = rows["history"] if config.exclude_history else None
    lists = most_popular_lists(data, len(rows), max(config.ks), exclude)
    targets = rows["target"]
    return {"metrics": score_lists(lists, targets, data, config.ks), "ranks": target_ranks(lists, targets)}


def run(recipe: Recipe) -> dict:
    config = recipe.eval
    timer = Timer()
    data = load_run_data(recipe.stage_dir("data"))
    rows = eval_rows(data, config.split, config, config.max_users)
    result = evaluate(data, config, rows)
    write_report(recipe.stage_dir("most_popular"), {"most-popular": result}, data, config, rows)
    write_outputs(recipe, "most_popular", [data.path / "dataset"], timer)
    return result


def report(recipe: Recipe, result: dict) -> list[str]:
    """What `rlrec baseline most_popular` prints."""
    return baseline_report(recipe, "most_popular", result)


def baseline_report(recipe: Recipe, name: str, result: dict) -> list[str]:
    m = result["metrics"]
    return [f"wrote {recipe.stage_dir(name)}",
            f"  {name}: HR@10 {m['hr@10']:.4f}  NDCG@10 {m['ndcg@10']:.4f}  MRR@10 {m['mrr@10']:.4f}"]  # fmt: skip
