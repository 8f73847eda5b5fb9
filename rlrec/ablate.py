"""Reward ablations: run the GRPO stage once per (reward set, seed) from the same SFT model, and tabulate.

    rlrec ablate --config recipes/<dataset>/grpo_<x>.yaml --grid rewards/ablations/<grid>.yaml [--jobs 2]

Every cell is a full `rlrec grpo` run in its own process (its own folder under
`runs/<name>/ablations/<grid>/cells/<set>-s<seed>/`, with the run's `data` and `sft` linked in, never copied or
retrained), so cells are independent and a crashed cell does not take the others down. A cell whose
`grpo/metrics.json` exists is not rerun. The table reports test metrics as mean and sample standard deviation over
seeds, next to the SFT model the cells start from, under one protocol (the run's split, full catalogue).
Outputs: `results.json` (every cell's metrics and guard curve), `table.md`, and `curves.png` when matplotlib is
installed (the `plot` extra).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlrec.config import dump_config, load_config, merge, to_dict
from rlrec.errors import ConfigError, RlrecError
from rlrec.recipe import Recipe

METRICS = ("ndcg@10", "hr@10", "ndcg@20", "hr@20", "coverage@10")


@dataclass
class AblationGrid:
    reward_sets: dict[str, dict[str, float]]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    overrides: dict = field(default_factory=dict)  # nested recipe keys applied to every cell (e.g. grpo.train)
    reward_params: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.reward_sets or not self.seeds:
            raise ConfigError("an ablation grid needs reward_sets and seeds")
        for name in self.reward_sets:
            if not name or "/" in name or " " in name:
                raise ConfigError(f"reward set name {name!r}: use a plain name like hit+ndcg")


def cell_recipe(base: Recipe, grid: AblationGrid, reward_set: str, seed: int, cells: Path) -> dict:
    raw = merge(to_dict(base), grid.overrides)
    raw["grpo"]["rewards"] = dict(grid.reward_sets[reward_set])
    raw["grpo"]["reward_params"] = {k: v for k, v in grid.reward_params.items() if k in grid.reward_sets[reward_set]}
    raw.update(name=f"{reward_set}-s{seed}", seed=seed, output_dir=str(cells))
    return raw


def link_inputs(base: Recipe, cell_dir: Path) -> None:
    """The cell reads the run's prepared data and SFT model through symlinks."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    for stage in ("data", "sft"):
        source, link = base.stage_dir(stage).resolve(), cell_dir / stage
        if not source.is_dir():
            raise RlrecError(f"{source}: missing; run the '{stage}' stage of {base.name} before the ablation")
        if not link.exists():
            os.symlink(source, link)


def summarise(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}  # fmt: skip


def table(base_metrics: dict, results: dict, seeds: list[int]) -> str:
    metrics = [m for m in METRICS if m in base_metrics]
    head = "| model | " + " | ".join(m.upper().replace("COVERAGE", "Coverage") for m in metrics) + " | steps kept |"
    lines = [head, "|" + "---|" * (len(metrics) + 2)]
    lines.append("| SFT (start) | " + " | ".join(f"{base_metrics[m]:.4f}" for m in metrics) + " | - |")
    for name, cell in results.items():
        stats = cell["summary"]
        kept = ", ".join(str(s) for s in cell["saved_steps"])
        lines.append(f"| GRPO {name} ({len(seeds)} seeds) | "
                     + " | ".join(f"{stats[m]['mean']:.4f} ± {stats[m]['std']:.4f}" for m in metrics)
                     + f" | {kept} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(results: dict, out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, cell in results.items():
        for i, run in enumerate(cell["runs"]):
            steps = [g["step"] for g in run["guard"]]
            ax.plot(steps, [g["ndcg@10"] for g in run["guard"]], color=f"C{list(results).index(name)}", alpha=0.7,
                    label=name if i == 0 else None)  # fmt: skip
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("guard NDCG@10 (held-out valid users)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return True


def run_ablation(config_path: str, grid_path: str, jobs: int = 1, overrides: list[str] | None = None) -> dict:
    base = load_config(Recipe, config_path, overrides or [])
    base.section("grpo")
    grid = load_config(AblationGrid, grid_path)
    out = base.run_dir / "ablations" / Path(grid_path).stem
    cells = out / "cells"
    pending, running = [], []
    for reward_set in grid.reward_sets:
        for seed in grid.seeds:
            raw = cell_recipe(base, grid, reward_set, seed, cells)
            recipe = load_config(Recipe, _write(cells / f"{reward_set}-s{seed}.yaml", raw))  # validated like a recipe
            link_inputs(base, recipe.run_dir)
            if not (recipe.stage_dir("grpo") / "metrics.json").is_file():
                pending.append(recipe)
    print(f"rlrec ablate: {len(grid.reward_sets)} reward sets x {len(grid.seeds)} seeds, {len(pending)} to run, "
          f"{jobs} at a time -> {out}", flush=True)  # fmt: skip
    failed = []
    while pending or running:
        while pending and len(running) < jobs:
            recipe = pending.pop(0)
            log = (recipe.run_dir / "grpo.log").open("w")
            command = [sys.executable, "-m", "rlrec.cli", "grpo", "--config", str(cells / f"{recipe.name}.yaml")]
            running.append((recipe, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), time.time()))
        time.sleep(2)
        for entry in list(running):
            recipe, process, started = entry
            if process.poll() is not None:
                running.remove(entry)
                status = "ok" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
                print(f"  {recipe.name}: {status} in {time.time() - started:.0f} s", flush=True)
                if process.returncode:
                    failed.append(recipe.name)
    if failed:
        raise RlrecError(f"ablation cells failed: {', '.join(failed)}; see {cells}/<cell>/grpo.log")
    return collect(base, grid, out)


def _write(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def collect(base: Recipe, grid: AblationGrid, out: Path) -> dict:
    sft = json.loads((base.stage_dir("sft") / "metrics.json").read_text())
    split = base.grpo.eval_splits[0]
    results = {}
    for reward_set in grid.reward_sets:
        runs = []
        for seed in grid.seeds:
            metrics = json.loads((out / "cells" / f"{reward_set}-s{seed}" / "grpo" / "metrics.json").read_text())
            runs.append({"seed": seed, "metrics": metrics[split]["metrics"], "guard": metrics["training"]["guard"],
                         "saved_step": metrics["training"]["saved_step"],
                         "global_step": metrics["training"]["global_step"]})  # fmt: skip
        results[reward_set] = {
            "rewards": grid.reward_sets[reward_set], "runs": runs,
            "saved_steps": [r["saved_step"] for r in runs],
            "summary": {m: summarise([r["metrics"][m] for r in runs]) for m in METRICS if m in runs[0]["metrics"]},
        }  # fmt: skip
    report = {"protocol": sft["protocol"], "split": split, "sft": sft[split]["metrics"], "results": results}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    text = table(sft[split]["metrics"], results, grid.seeds)
    (out / "table.md").write_text(f"Test split, {sft['protocol']['split_method']}, full catalogue "
                                  f"({sft['protocol']['num_items']} items).\n\n{text}")  # fmt: skip
    plot(results, out / "curves.png")
    dump_config(base, out / "base_config.yaml")
    print(text)
    return report
