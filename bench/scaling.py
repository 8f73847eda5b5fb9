"""How SFT cost grows with the catalogue and the history, and how test NDCG@10 grows with model size.

Two measurements, each point a real `rlrec` run in its own subprocess (its peak memory is that process's own,
read with `os.wait4`):

    python bench/scaling.py cost  [--steps 40]      # training time and peak memory per point
    python bench/scaling.py size  [--epochs 2] [--hidden 16 32 64 128]   # test NDCG@10 per model size, MovieLens-100K

`cost`: SFT steps on the synthetic default with item-id identifiers (one new token per item, so the catalogue sets
the embedding and output-layer size), a from-scratch Llama (hidden 128, 2 layers), batch 64, one thread. It varies
the catalogue (1,000 / 4,000 / 16,000 items at history 10) and the history length (5 / 10 / 20 items at 4,000 items).
Each point reports seconds per training step (TRL's `train_runtime / steps`), the setup before the first step
(building the tokenizer and model, tokenising: `train_seconds - train_runtime`), the evaluation's seconds per 100
users (constrained beam 20 over the full catalogue) and the process's peak RSS; the ratio columns are against the
named baseline point (catalogue 1,000 for the catalogue sweep, history 5 for the history sweep), run in the same
invocation.

`size`: the MovieLens-100K SFT recipe (`recipes/movielens-100k/sft_id.yaml`, leave-one-out, full catalogue of 1,682
items) at several model sizes (hidden 64 / 128 / 256 by default, 2 layers), the same data, epochs and learning
rate, test split. A size whose run already finished under the same `--out` is read back (its manifest's wall time
and peak memory), so an interrupted sweep resumes.
Results go to `docs/scaling.json` (and are printed as Markdown); docs/results.md records them with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CATALOGUES = (1000, 4000, 16000)
HISTORIES = (5, 10, 20)
HIDDEN = (16, 32, 64, 128)  # hidden sizes of the `size` sweep, 2 layers each


def run(args: list[str], log: Path) -> tuple[float, float]:
    """Run `rlrec <args>`; return (wall seconds, peak RSS in MB) of that process alone."""
    started = time.time()
    with log.open("a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rlrec.cli", *args], stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"rlrec {' '.join(args)} failed; see {log}")
    return time.time() - started, usage.ru_maxrss / 1024


def cost_recipe(out: Path, items: int, history: int, steps: int) -> dict:
    return {
        "name": f"cost-i{items}-h{history}",
        "output_dir": str(out),
        "seed": 0,
        "data": {
            "source": {
                "format": "synthetic",
                "synthetic": {
                    "num_users": 2000,
                    "num_items": items,
                    "num_categories": 20,
                    "min_length": history + 3,
                    "max_length": history + 8,
                },
            },  # fmt: skip
            "split": {"method": "leave_one_out", "max_history": history},
            "prompt": {"identifier": "id", "template": "History: {history}", "separator": " "},
        },
        "sft": {
            "model": {"hidden_size": 128, "layers": 2, "heads": 4},
            "train": {
                "max_steps": steps,
                "learning_rate": 0.003,
                "batch_size": 64,
                "logging_steps": 10,
                "save_steps": 10_000,
                "threads": 1,
                "report_to": [],
            },  # fmt: skip
            "max_length": 256,
            "eval_splits": ["test"],
            "eval_max_users": 100,
        },
        "eval": {"ks": [10], "beam_width": 20, "batch_size": 32},
    }


def cost(steps: int, out: Path) -> list[dict]:
    points = [(i, 10) for i in CATALOGUES] + [(4000, h) for h in HISTORIES if h != 10]
    rows = []
    for items, history in points:
        recipe = cost_recipe(out, items, history, steps)
        path = out / f"{recipe['name']}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        run(["data", "prepare", "--config", str(path)], out / "log.txt")
        wall, peak = run(["sft", "--config", str(path)], out / "log.txt")
        metrics = json.loads((out / recipe["name"] / "sft" / "metrics.json").read_text())
        training = metrics["training"]
        # TRL's own train_runtime (the last log line) times the optimisation steps alone
        final = json.loads((out / recipe["name"] / "sft" / "train_log.jsonl").read_text().splitlines()[-1])
        rows.append({"catalogue": items, "history": history, "parameters": training["parameters"],
                     "seconds_per_step": final["train_runtime"] / final["step"],
                     "setup_seconds": round(training["train_seconds"] - final["train_runtime"], 1),
                     "eval_seconds_per_100_users": metrics["test"]["seconds"] / metrics["test"]["num_users"] * 100,
                     "peak_rss_mb": round(peak), "wall_seconds": round(wall, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def size(epochs: float, out: Path, hidden_sizes=HIDDEN, layers: int = 2) -> list[dict]:
    base = yaml.safe_load((REPO / "recipes/movielens-100k/sft_id.yaml").read_text())
    base["data"]["source"]["path"] = str(REPO / base["data"]["source"]["path"])
    rows = []
    for hidden in hidden_sizes:
        recipe = json.loads(json.dumps(base))
        recipe.update(name=f"size-h{hidden}-l{layers}", output_dir=str(out))
        recipe["sft"]["model"] = {"hidden_size": hidden, "layers": layers, "heads": 4}
        recipe["sft"]["train"].update(epochs=epochs, threads=1)
        recipe["sft"]["eval_splits"] = ["test"]
        path = out / f"{recipe['name']}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        if not rows:
            run(["data", "prepare", "--config", str(path)], out / "log.txt")
            shared_data = (out / recipe["name"] / "data").resolve()  # absolute: the link lives one folder deeper
        else:  # same prepared data for every size
            (out / recipe["name"]).mkdir(exist_ok=True)
            if not (out / recipe["name"] / "data").exists():
                (out / recipe["name"] / "data").unlink(missing_ok=True)  # a dangling link from an older run
                os.symlink(shared_data, out / recipe["name"] / "data")
        stage = out / recipe["name"] / "sft"
        if (stage / "metrics.json").is_file():  # measured by an earlier invocation with the same --out: reuse
            manifest = json.loads((stage / "manifest.json").read_text())
            wall, peak = manifest["wall_time_s"], manifest["peak_rss_mb"]
        else:
            wall, peak = run(["sft", "--config", str(path)], out / "log.txt")
        metrics = json.loads((stage / "metrics.json").read_text())
        test = metrics["test"]["metrics"]
        rows.append({"hidden": hidden, "layers": layers, "parameters": metrics["training"]["parameters"],
                     "epochs": epochs, "ndcg@10": test["ndcg@10"], "hr@10": test["hr@10"],
                     "train_seconds": metrics["training"]["train_seconds"], "peak_rss_mb": round(peak),
                     "wall_seconds": round(wall, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return sorted(rows, key=lambda row: row["parameters"])


def markdown(kind: str, rows: list[dict]) -> str:
    if kind == "cost":
        lines = ["| catalogue | history | parameters | s / step | ratio | setup s | eval s / 100 users | ratio "
                 "| peak RSS (MB) |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in rows:
            # baseline: the smallest catalogue for the catalogue sweep, the shortest history for the history sweep
            base = rows[0] if row["history"] == 10 else next(r for r in rows if r["history"] == min(HISTORIES))
            lines.append(f"| {row['catalogue']:,} | {row['history']} | {row['parameters']:,} | "
                         f"{row['seconds_per_step']:.3f} | {row['seconds_per_step'] / base['seconds_per_step']:.2f}x | "
                         f"{row['setup_seconds']:.1f} | "
                         f"{row['eval_seconds_per_100_users']:.2f} | "
                         f"{row['eval_seconds_per_100_users'] / base['eval_seconds_per_100_users']:.2f}x | "
                         f"{row['peak_rss_mb']:,} |")  # fmt: skip
        return "\n".join(lines)
    lines = ["| hidden x layers | parameters | epochs | test NDCG@10 | test HR@10 | train s | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        lines.append(f"| {row['hidden']} x {row['layers']} | {row['parameters']:,} | {row['epochs']:g} | "
                     f"{row['ndcg@10']:.4f} | {row['hr@10']:.4f} | {row['train_seconds']:.0f} | "
                     f"{row['peak_rss_mb']:,} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["cost", "size"])
    parser.add_argument("--steps", type=int, default=40, help="cost: SFT steps per point")
    parser.add_argument("--epochs", type=float, default=2, help="size: SFT epochs per model size")
    parser.add_argument("--hidden", type=int, nargs="+", default=list(HIDDEN), help="size: hidden sizes (2 layers)")
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--record", default=str(REPO / "docs/scaling.json"))
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix=f"rlrec-scaling-{args.kind}-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = cost(args.steps, out) if args.kind == "cost" else size(args.epochs, out, args.hidden)
    print(markdown(args.kind, rows))
    record = Path(args.record)
    results = json.loads(record.read_text()) if record.is_file() else {}
    results[args.kind] = {"command": " ".join(["python", "bench/scaling.py", *sys.argv[1:]]), "rows": rows}
    record.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
