"""Ablations: run a post-training stage once per (variant, seed) from the same SFT model, and tabulate.

    rlrec ablate --config recipes/<dataset>/ablations/<grid>.yaml [--jobs 2]  # the grid names its recipe
    rlrec ablate --config recipes/<dataset>/grpo_<x>.yaml --grid recipes/<dataset>/ablations/<grid>.yaml

A grid varies either GRPO's rewards (`reward_sets`: name -> {reward: weight}) or whole stages (`variants`: name ->
{stage: grpo | dpo, overrides: {...recipe keys...}}), e.g. GRPO against DPO against S-DPO from one SFT model.

When the recipe's SFT model does not exist yet, the pipeline runs the stages up to SFT first (`rlrec pipeline`).

Every cell is a full `rlrec grpo` / `rlrec dpo` run in its own process (its own folder under
`runs/<name>/ablations/<grid>/cells/<set>-s<seed>/`, with the run's `data`, `sft` (and `sasrec`) linked in, never
copied or retrained), so cells are independent and a crashed cell does not take the others down. A cell whose
`<stage>/metrics.json` exists is not rerun. The table reports test metrics as mean and sample standard deviation
over seeds, next to the SFT model the cells start from, and each variant's difference to the grid's `reference`,
under one protocol (the run's split, full catalogue). Outputs: `results.json` (every cell's metrics, guard curve and
reward curve), `results.csv` and `table.md` (one row per variant), and `ablation.png` when matplotlib is installed
(the `plot` extra): the test metric per variant with error bars, the GRPO training reward and the guard's NDCG@10
per step.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from rlrec.config import dump_config, load_config, merge, to_dict
from rlrec.errors import ConfigError, RlrecError
from rlrec.ownership import child_environment, hold_run
from rlrec.pipeline import run_pipeline
from rlrec.recipe import Recipe

METRICS = ("ndcg@10", "hr@10", "ndcg@20", "hr@20", "coverage@10", "tail_share@10")


@dataclass
class Variant:
    stage: Literal["grpo", "dpo"] = "grpo"
    overrides: dict = field(default_factory=dict)  # nested recipe keys for this variant (e.g. dpo: {loss: sdpo})


@dataclass
class AblationGrid:
    reward_sets: dict[str, dict[str, float]] = field(default_factory=dict)  # GRPO variants differing in rewards
    variants: dict[str, Variant] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    recipe: str | None = None  # the recipe the cells vary (needed unless given with --config/--grid)
    reference: str | None = None  # differences are reported against this variant (default: the first)
    overrides: dict = field(default_factory=dict)  # nested recipe keys applied to every cell (e.g. grpo.train)
    reward_params: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.reward_sets or self.variants) or not self.seeds:
            raise ConfigError("an ablation grid needs reward_sets or variants, and seeds")
        both = set(self.reward_sets) & set(self.variants)
        if both:
            raise ConfigError(f"ablation grid: {sorted(both)} named both as a reward set and a variant")
        if self.reference is not None and self.reference not in self.names:
            raise ConfigError(f"reference {self.reference!r} is not one of the grid's variants {self.names}")
        for name in self.names:
            if not name or "/" in name or " " in name:
                raise ConfigError(f"variant name {name!r}: use a plain name like hit+ndcg")

    @property
    def names(self) -> list[str]:
        return [*self.reward_sets, *self.variants]

    def stage(self, name: str) -> str:
        return self.variants[name].stage if name in self.variants else "grpo"


def cell_recipe(base: Recipe, grid: AblationGrid, name: str, seed: int, cells: Path) -> dict:
    raw = merge(to_dict(base), grid.overrides)
    if name in grid.reward_sets:
        raw["grpo"]["rewards"] = dict(grid.reward_sets[name])
        raw["grpo"]["reward_params"] = {k: v for k, v in grid.reward_params.items() if k in grid.reward_sets[name]}
    else:
        raw = merge(raw, grid.variants[name].overrides)
    raw.update(name=f"{name}-s{seed}", seed=seed, output_dir=str(cells))
    return raw


def link_inputs(base: Recipe, cell_dir: Path) -> None:
    """The cell reads the run's prepared data and SFT model (and its SASRec, the `teacher` reward's scorer, when the
    run has one) through symlinks."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    for stage in ("data", "sft", "sasrec"):
        source, link = base.stage_dir(stage).resolve(), cell_dir / stage
        if not source.is_dir():
            if stage == "sasrec":
                continue
            raise RlrecError(f"{source}: missing; run the '{stage}' stage of {base.name} before the ablation")
        if not link.exists():
            os.symlink(source, link)


def summarise(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}  # fmt: skip


def reference_set(grid: AblationGrid) -> str:
    return grid.reference or grid.names[0]


def table(base_metrics: dict, results: dict, seeds: list[int], reference: str) -> str:
    metrics = [m for m in METRICS if m in base_metrics]
    head = ("| model | " + " | ".join(m.upper().replace("COVERAGE", "Coverage") for m in metrics)
            + f" | NDCG@10 - {reference} | steps kept |")  # fmt: skip
    lines = [head, "|" + "---|" * (len(metrics) + 3)]
    lines.append("| SFT (start) | " + " | ".join(f"{base_metrics[m]:.4f}" for m in metrics) + " | - | - |")
    for name, cell in results.items():
        stats = cell["summary"]
        kept = ", ".join(str(s) for s in cell["saved_steps"])
        diff = "reference" if name == reference else f"{cell['diff_vs_reference']['ndcg@10']:+.4f}"
        lines.append(f"| {name} ({cell['method']}, {len(seeds)} seeds) | "
                     + " | ".join(f"{stats[m]['mean']:.4f} ± {stats[m]['std']:.4f}" for m in metrics)
                     + f" | {diff} | {kept} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_csv(path: Path, base_metrics: dict, results: dict, reference: str) -> None:
    """One row per variant (and the SFT start): mean and sample std over seeds, difference to the reference."""
    metrics = [m for m in METRICS if m in base_metrics]
    header = ["model", "stage", "rewards", "seeds"] + [f"{m}_{s}" for m in metrics for s in ("mean", "std")]
    header += [f"{m}_diff_vs_{reference}" for m in ("ndcg@10", "hr@10")]
    rows = [["sft", "sft", "", 1] + [v for m in metrics for v in (base_metrics[m], "")] + ["", ""]]
    for name, cell in results.items():
        rewards = ";".join(f"{k}:{v:g}" for k, v in cell["rewards"].items())
        stats = cell["summary"]
        rows.append([name, cell["stage"], rewards, len(cell["runs"])]
                    + [round(v, 6) for m in metrics for v in (stats[m]["mean"], stats[m]["std"])]
                    + [round(cell["diff_vs_reference"][m], 6) for m in ("ndcg@10", "hr@10")])  # fmt: skip
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def plot(base_metrics: dict, results: dict, out: Path) -> bool:
    """Three panels: test NDCG@10 per variant (mean, error bar = std over seeds, SFT dashed), the mean training
    reward per step, and the guard's held-out NDCG@10 per step (one line per seed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(results)
    fig, (bars, rewards, guard) = plt.subplots(1, 3, figsize=(15, 4.2))
    means = [results[n]["summary"]["ndcg@10"]["mean"] for n in names]
    stds = [results[n]["summary"]["ndcg@10"]["std"] for n in names]
    bars.errorbar(range(len(names)), means, yerr=stds, fmt="o", capsize=5, color="C0")
    bars.axhline(base_metrics["ndcg@10"], color="grey", linestyle="--", label="SFT start")
    bars.set_xticks(range(len(names)), names, rotation=20, ha="right")
    bars.set_ylabel("test NDCG@10 (mean ± std over seeds)")
    bars.legend()
    for i, name in enumerate(names):
        for j, run in enumerate(results[name]["runs"]):
            label = name if j == 0 else None
            if run["reward_curve"]:
                steps, values = zip(*run["reward_curve"], strict=True)
                rewards.plot(steps, values, color=f"C{i}", alpha=0.7, label=label)
            guard.plot([g["step"] for g in run["guard"]], [g["ndcg@10"] for g in run["guard"]], color=f"C{i}",
                       alpha=0.7, label=label)  # fmt: skip
    rewards.set_xlabel("GRPO step")
    rewards.set_ylabel("mean total reward of the step's rollouts (GRPO)")
    guard.set_xlabel("training step (DPO rounds one after another)")
    guard.set_ylabel("guard NDCG@10 (held-out valid users)")
    rewards.legend()
    guard.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def run_ablation(config_path: str, grid_path: str | None = None, jobs: int = 1,
                 overrides: list[str] | None = None) -> dict:  # fmt: skip
    """`grid_path` None: `config_path` is the grid and names its recipe; else `config_path` is the recipe."""
    if grid_path is None:
        grid_path = config_path
        grid = load_config(AblationGrid, grid_path)
        if grid.recipe is None:
            raise ConfigError(f"{grid_path}: name the recipe (recipe: recipes/...yaml) or pass --grid")
        config_path = grid.recipe
    else:
        grid = load_config(AblationGrid, grid_path)
    base = load_config(Recipe, config_path, overrides or [])
    for stage in {grid.stage(name) for name in grid.names}:
        base.section(stage)
    with hold_run(base.run_dir, f"rlrec ablate {grid_path}"):  # the SFT run every cell starts from is ours
        return _run_cells(base, grid, grid_path, jobs)


def _run_cells(base: Recipe, grid: AblationGrid, grid_path: str, jobs: int) -> dict:
    if not (base.stage_dir("sft") / "model").is_dir():
        print(f"rlrec ablate: no SFT model in {base.stage_dir('sft')}; running the pipeline up to SFT", flush=True)
        run_pipeline(base, until="sft")
    out = base.run_dir / "ablations" / Path(grid_path).stem
    cells = out / "cells"
    pending, running = [], []
    for name in grid.names:
        for seed in grid.seeds:
            raw = cell_recipe(base, grid, name, seed, cells)
            recipe = load_config(Recipe, _write(cells / f"{name}-s{seed}.yaml", raw))  # validated like a recipe
            link_inputs(base, recipe.run_dir)
            if not (recipe.stage_dir(grid.stage(name)) / "metrics.json").is_file():
                pending.append((recipe, grid.stage(name)))
    print(f"rlrec ablate: {len(grid.names)} variants x {len(grid.seeds)} seeds, {len(pending)} to run, "
          f"{jobs} at a time -> {out}", flush=True)  # fmt: skip
    failed = []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                recipe, stage = pending.pop(0)
                log = (recipe.run_dir / f"{stage}.log").open("w")
                command = [sys.executable, "-m", "rlrec.cli", stage, "--config", str(cells / f"{recipe.name}.yaml")]
                # a cell stops when this process is gone (rlrec.ownership.watch_parent)
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_environment())
                running.append((recipe, process, time.time(), log))
            time.sleep(2)
            for entry in list(running):
                recipe, process, started, log = entry
                if process.poll() is not None:
                    running.remove(entry)
                    log.close()
                    status = "ok" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
                    print(f"  {recipe.name}: {status} in {time.time() - started:.0f} s", flush=True)
                    if process.returncode:
                        failed.append(recipe.name)
    finally:  # stopped (SIGTERM arrives as rlrec.errors.Stopped, Ctrl-C) or failed: no cell keeps training alone
        for _, process, _, _ in running:
            process.terminate()  # SIGTERM: the cell's own CLI stops its trainer, what it checkpointed resumes
        for _, process, _, log in running:
            process.wait(timeout=120)
            log.close()
    if failed:
        raise RlrecError(f"ablation cells failed: {', '.join(failed)}; see {cells}/<cell>/<stage>.log")
    return collect(base, grid, out)


def reward_curve(log_path: Path) -> list[tuple[int, float]]:
    """(step, mean total reward) from a GRPO train_log.jsonl (TRL logs `reward` every `logging_steps`)."""
    if not log_path.is_file():
        return []
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    return [(row["step"], row["reward"]) for row in rows if "reward" in row and "step" in row]


def _write(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def guard_curve(training: dict) -> list[dict]:
    """The guard's evaluations of a GRPO run, or of a DPO run's rounds one after another (steps offset)."""
    if "rounds" not in training:
        return training["guard"]
    curve, offset = [], 0
    for summary in training["rounds"]:
        curve += [{**g, "step": g["step"] + offset} for g in summary["guard"]]
        offset += summary["global_step"]
    return curve


def collect(base: Recipe, grid: AblationGrid, out: Path) -> dict:
    sft = json.loads((base.stage_dir("sft") / "metrics.json").read_text())
    splits = {base.section(grid.stage(name)).eval_splits[0] for name in grid.names}
    if len(splits) > 1:
        raise ConfigError(f"the grid's stages evaluate different splits {sorted(splits)}; a table mixes no protocols")
    split = splits.pop()
    results = {}
    for name in grid.names:
        stage, runs, methods, rewards = grid.stage(name), [], set(), dict(grid.reward_sets.get(name) or {})
        for seed in grid.seeds:
            cell_dir = out / "cells" / f"{name}-s{seed}"
            metrics = json.loads((cell_dir / stage / "metrics.json").read_text())
            training = metrics["training"]
            runs.append({"seed": seed, "metrics": metrics[split]["metrics"], "guard": guard_curve(training),
                         "saved_step": training["saved_step"], "global_step": training["global_step"],
                         "reward_curve": reward_curve(cell_dir / stage / "train_log.jsonl")})  # fmt: skip
            methods.add("GRPO" if stage == "grpo" else {"dpo": "DPO", "sdpo": "S-DPO"}[training["loss"]])
            if stage == "grpo" and not grid.reward_sets.get(name):
                rewards = training.get("rewards", {})
        if len(methods) > 1:  # a variant's seeds differ only in their seed: anything else is a broken cell folder
            raise RlrecError(f"variant {name}: its seeds ran different methods {sorted(methods)}; see {out / 'cells'}")
        method = methods.pop()
        results[name] = {
            "stage": stage, "method": method, "rewards": rewards, "runs": runs,
            "saved_steps": [r["saved_step"] for r in runs],
            "summary": {m: summarise([r["metrics"][m] for r in runs]) for m in METRICS if m in runs[0]["metrics"]},
        }  # fmt: skip
    reference = reference_set(grid)
    for cell in results.values():
        cell["diff_vs_reference"] = {m: cell["summary"][m]["mean"] - results[reference]["summary"][m]["mean"]
                                     for m in cell["summary"]}  # fmt: skip
    report = {"protocol": sft["protocol"], "split": split, "sft": sft[split]["metrics"], "reference": reference,
              "results": results}  # fmt: skip
    (out / "results.json").write_text(json.dumps(report, indent=2))
    write_csv(out / "results.csv", sft[split]["metrics"], results, reference)
    text = table(sft[split]["metrics"], results, grid.seeds, reference)
    (out / "table.md").write_text(f"Test split, {sft['protocol']['split_method']}, full catalogue "
                                  f"({sft['protocol']['num_items']} items).\n\n{text}")  # fmt: skip
    plot(sft[split]["metrics"], results, out / "ablation.png")
    dump_config(base, out / "base_config.yaml")
    print(text)
    return report
