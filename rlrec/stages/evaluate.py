"""`rlrec baseline most_popular|sasrec` and `rlrec eval`: score baselines and models with the one harness.

Folders: `runs/<name>/most_popular/`, `runs/<name>/sasrec/` (model.pt, train_log.jsonl), `runs/<name>/eval/`;
each with `metrics.json` (protocol + numbers), the resolved `config.yaml` and `manifest.json`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rlrec.baselines import load_sasrec, most_popular_lists, sasrec_lists, save_sasrec, train_sasrec
from rlrec.baselines.sasrec import SASRecConfig
from rlrec.config import dump_config
from rlrec.evaluate import EvalConfig, RunData, load_run_data, score_lists, write_report
from rlrec.manifest import write_manifest
from rlrec.recipe import Recipe


def _finish(recipe: Recipe, out: Path, data: RunData, started: float, stage: str) -> None:
    dump_config(recipe, out / "config.yaml")
    write_manifest(out, [data.path / "dataset"], recipe.seed, time.time() - started, stage=stage)


def run_most_popular(recipe: Recipe) -> dict:
    config = recipe.eval or EvalConfig()
    started = time.time()
    data = load_run_data(recipe.stage_dir("data"))
    rows = data.rows(config.split, config.max_users)
    result = baseline_result("most_popular", recipe, data, config, rows)
    out = recipe.stage_dir("most_popular")
    write_report(out, {"most-popular": result}, data, config, {"num_users": len(rows)})
    _finish(recipe, out, data, started, "most_popular")
    return result


def run_sasrec(recipe: Recipe) -> dict:
    config = recipe.eval or EvalConfig()
    sasrec = recipe.sasrec or SASRecConfig()
    started = time.time()
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
    _finish(recipe, out, data, started, "sasrec")
    return result


def baseline_result(name: str, recipe: Recipe, data: RunData, config: EvalConfig, rows) -> dict:
    """Score one baseline (`most_popular`, or the run's trained `sasrec`) on `rows`."""
    if name == "most_popular":
        exclude = rows["history"] if config.exclude_history else None
        lists = most_popular_lists(data, len(rows), max(config.ks), exclude)
    else:
        model = load_sasrec(recipe.stage_dir("sasrec"), recipe.sasrec or SASRecConfig())
        lists = sasrec_lists(model, data, rows, max(config.ks), config.exclude_history)
    return {"metrics": score_lists(lists, rows["target"], data, config.ks)}


def evaluate_baselines(recipe: Recipe, data: RunData, config: EvalConfig, rows) -> dict:
    names = {"most_popular": "most-popular", "sasrec": "sasrec"}
    return {names[name]: baseline_result(name, recipe, data, config, rows) for name in config.baselines}


def evaluate_generative(model, tokenizer, data: RunData, config: EvalConfig, rows, progress: bool = True) -> dict:
    """Constrained top-K beam of a generative model on `rows`, scored by the harness."""
    from rlrec.decoding import ItemTrie, recommend

    started = time.time()
    trie = ItemTrie.build(tokenizer, data.identifiers)
    recs = recommend(
        model, tokenizer, rows["prompt"], k=max(config.ks), trie=trie, beam_width=config.beam_width,
        batch_size=config.batch_size, exclude=rows["history"] if config.exclude_history else None,
        progress=progress,
    )  # fmt: skip
    lists = [[item for item, _ in rec] for rec in recs]
    return {
        "metrics": score_lists(lists, rows["target"], data, config.ks),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.time() - started, 1),
    }


TRAINED_STAGES = ("grpo", "dpo", "sft")


def latest_model(recipe: Recipe) -> Path | None:
    """The model of the last trained stage of the run (GRPO, then DPO, then SFT), if any."""
    for stage in TRAINED_STAGES:
        path = recipe.stage_dir(stage) / "model"
        if path.is_dir():
            return path
    return None


def run_eval(recipe: Recipe) -> dict:
    from rlrec.models import load_model

    config = recipe.eval or EvalConfig()
    started = time.time()
    data = load_run_data(recipe.stage_dir("data"))
    rows = data.rows(config.split, config.max_users)
    results = {}
    model_path = Path(config.model) if config.model else latest_model(recipe)
    if model_path is not None:
        model, tokenizer = load_model(str(model_path))
        results[model_path.parent.name if model_path.name == "model" else model_path.name] = {
            **evaluate_generative(model, tokenizer, data, config, rows),
            "model": str(model_path),
        }
    results.update(evaluate_baselines(recipe, data, config, rows))
    out = recipe.stage_dir("eval")
    write_report(out, results, data, config, {"num_users": len(rows)})
    _finish(recipe, out, data, started, "eval")
    return results
