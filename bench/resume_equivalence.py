"""Does a resumed SFT run reproduce the uninterrupted one? For a tiny synthetic run (the test suite's
`tiny_pipeline`, 120 steps, a guard every 20 steps), with and without dropout: train to the end; copy the data and
the checkpoint at step 100 (what a run killed after that save holds) into a second run; resume it; print both runs'
test NDCG@10, their train loss (averaged over the steps each process ran) and the largest weight difference.

    python bench/resume_equivalence.py --out /tmp/resume-check
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rlrec.config import from_dict  # noqa: E402
from rlrec.recipe import Recipe  # noqa: E402
from rlrec.stages import data, sft  # noqa: E402
from tests.conftest import tiny_pipeline  # noqa: E402


def recipe(out: Path, dropout: bool) -> Recipe:
    raw = tiny_pipeline(out, max_steps=120)
    if dropout:
        raw["sft"]["model"].update(architecture="phi", dropout=0.1)
    raw["sft"]["select"] = {"eval_steps": 20, "users": None, "patience": 0}
    return from_dict(Recipe, raw)


def compare(root: Path, dropout: bool, step: int = 100) -> dict:
    full, resumed = recipe(root / f"full-{dropout}", dropout), recipe(root / f"resumed-{dropout}", dropout)
    data.run(full)
    sft.run(full)
    shutil.copytree(full.stage_dir("data"), resumed.stage_dir("data"))
    checkpoints = resumed.stage_dir("sft") / "checkpoints"
    shutil.copytree(full.stage_dir("sft") / "checkpoints" / f"checkpoint-{step}", checkpoints / f"checkpoint-{step}")
    shutil.copy(full.stage_dir("sft") / "checkpoints" / "inputs.json", checkpoints / "inputs.json")
    sft.run(resumed)
    metrics = [json.loads((r.stage_dir("sft") / "metrics.json").read_text()) for r in (full, resumed)]
    weights = [load_file(str(r.stage_dir("sft") / "model" / "model.safetensors")) for r in (full, resumed)]
    difference = max(float((weights[0][n] - weights[1][n]).abs().max()) for n in weights[0])
    return {"dropout": dropout, "resumed_from_step": step,
            "uninterrupted_test_ndcg@10": metrics[0]["test"]["metrics"]["ndcg@10"],
            "resumed_test_ndcg@10": metrics[1]["test"]["metrics"]["ndcg@10"],
            "uninterrupted_train_loss": metrics[0]["training"]["train_loss"],
            "resumed_train_loss": metrics[1]["training"]["train_loss"],
            "max_weight_difference": difference}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the four runs")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        sys.exit(f"{args.out}: not empty; give a new folder")
    for dropout in (False, True):
        print(json.dumps(compare(args.out, dropout)), flush=True)


if __name__ == "__main__":
    main()
