"""`rlrec eval`: the run's latest model (or `eval.model`) and the listed baselines, scored on the same rows by
the one harness (`rlrec.evaluate`), in one table.

Writes `runs/<name>/eval/`: metrics.json (protocol + every system's numbers), metrics.md, config.yaml,
manifest.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rlrec.data.prepared import load_run_data
from rlrec.errors import RlrecError
from rlrec.evaluate import eval_rows, evaluate_generative, write_report
from rlrec.models import load_model
from rlrec.recipe import Recipe
from rlrec.stages import most_popular, sasrec
from rlrec.stages.runner import Timer, write_outputs

BASELINE_NAMES = {"most_popular": "most-popular", "sasrec": "sasrec"}


def run(recipe: Recipe) -> dict:
    config = recipe.eval
    timer = Timer()
    data = load_run_data(recipe.stage_dir("data"))
    rows = eval_rows(data, config.split, config, config.max_users)
    results = {}
    model_path = Path(config.model) if config.model else recipe.latest_model()
    if model_path is None:
        if not config.baselines:
            raise RlrecError(f"{recipe.run_dir}: no trained model (no sft/grpo/dpo model/) and no eval.baselines: "
                             "nothing to evaluate; train with `rlrec sft` or set eval.model")  # fmt: skip
        print(
            f"rlrec eval: {recipe.run_dir} has no trained model yet (no sft/grpo/dpo model/); the table holds "
            "the baselines only (train with `rlrec sft`, or set eval.model)",
            file=sys.stderr,
            flush=True,
        )
    else:
        model, tokenizer = load_model(str(model_path))
        results[model_path.parent.name if model_path.name == "model" else model_path.name] = {
            **evaluate_generative(model, tokenizer, data, config, rows),
            "model": str(model_path),
        }
    for name in config.baselines:
        if name == "most_popular":
            results[BASELINE_NAMES[name]] = most_popular.evaluate(data, config, rows)
        else:
            results[BASELINE_NAMES[name]] = sasrec.evaluate(recipe, data, config, rows)
    write_report(recipe.stage_dir("eval"), results, data, config, rows)
    write_outputs(recipe, "eval", [data.path / "dataset"], timer)
    return results


def report(recipe: Recipe, results: dict) -> list[str]:
    """What `rlrec eval` prints: the table written to metrics.md."""
    out = recipe.stage_dir("eval")
    return [f"wrote {out}", (out / "metrics.md").read_text()]
