"""Does validation predict test? For stage runs trained with `guard.shadow_split: test` (the guard also scores the
test split at every evaluation, same sample, never used to choose), print per run: the Spearman rank correlation of
validation and test NDCG@K over the evaluations (epochs or steps), the step validation would keep and the step test
would have kept, the test value lost by choosing on validation, and the test value a choice on the trailing mean of
3 or 5 validation evaluations would have kept (on the same curve: patience acted on the raw values).

    python bench/valid_test_agreement.py runs/ml100k-seq/sft runs/sci-sid-seq/sft [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scipy.stats import spearmanr

SMOOTHING = (3, 5)  # trailing windows of validation evaluations a smoothed choice would average


def agreement(stage_dir: Path) -> dict:
    curve = [json.loads(line) for line in (stage_dir / "guard.jsonl").read_text().splitlines() if line.strip()]
    if not curve:
        raise SystemExit(f"{stage_dir}: guard.jsonl is empty")
    metric = next(key for key in curve[0] if key.startswith("ndcg@"))
    shadow = f"test_{metric}"
    if shadow not in curve[0]:
        raise SystemExit(f"{stage_dir}: guard.jsonl has no {shadow}; train with guard.shadow_split: test")
    valid, test = [e[metric] for e in curve], [e[shadow] for e in curve]
    chosen = max(range(len(curve)), key=lambda i: valid[i])
    oracle = max(range(len(curve)), key=lambda i: test[i])
    rho = spearmanr(valid, test).statistic if len(curve) > 2 else float("nan")
    smoothed = {}
    for window in SMOOTHING:  # the best trailing mean of `window` validation evaluations
        means = [sum(valid[max(0, i - window + 1) : i + 1]) / len(valid[max(0, i - window + 1) : i + 1])
                 for i in range(len(valid))]  # fmt: skip
        smoothed[f"test_at_smooth_{window}"] = test[max(range(len(curve)), key=lambda i: means[i])]
    return {"run": str(stage_dir), "evaluations": len(curve), "spearman": round(float(rho), 3),
            "valid_choice_step": curve[chosen]["step"], "test_at_valid_choice": test[chosen], **smoothed,
            "test_best_step": curve[oracle]["step"], "test_best": test[oracle],
            "test_lost": round(test[oracle] - test[chosen], 5)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stages", nargs="+", type=Path, help="stage folders with guard.jsonl (runs/<name>/sft)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = [agreement(stage) for stage in args.stages]
    smooth = " | ".join(f"test, smooth {w}" for w in SMOOTHING)
    print(f"| run | evaluations | Spearman valid/test | valid keeps step | test there | {smooth} | test's best step "
          "| test best | lost |")  # fmt: skip
    print("|---" * (8 + len(SMOOTHING)) + "|")
    for r in rows:
        cells = " | ".join(f"{r[f'test_at_smooth_{w}']:.4f}" for w in SMOOTHING)
        print(f"| {r['run']} | {r['evaluations']} | {r['spearman']:.3f} | {r['valid_choice_step']} | "
              f"{r['test_at_valid_choice']:.4f} | {cells} | {r['test_best_step']} | {r['test_best']:.4f} | "
              f"{r['test_lost']:.4f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
