"""`rlrec tune`: search a stage's settings on validation, never on test, with Optuna (TPE sampler, median pruner).

    rlrec tune --config <recipe> --space <space.yaml> --budget 20      # trials
    rlrec tune --config <recipe> --space <space.yaml> --budget 3600s   # CPU-seconds of the trials (user + sys)

The space names one stage (`sft`, `grpo` or `dpo`) and the recipe keys to search under it:

    stage: sft
    params:
      sft.train.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}
      sft.train.epochs: {low: 5, high: 40, step: 5}          # integers when low, high and step are
      sft.model.dropout: {choices: [0.0, 0.1, 0.2]}

Each trial is the stage run as its own process (as `rlrec pipeline` runs it, `accelerate launch` included) on the
recipe with the trial's values, in `runs/<name>/tune/<space>/trials/t<NNN>/`, reading the run's prepared data (and
SFT model, for GRPO/DPO) through symlinks. Its objective is the stage's validation guard (`sft.select` /
`<stage>.guard`): NDCG@K on the guard's validation users of the weights the stage keeps. Trials evaluate no test
split (`eval_splits: []`), so nothing here can select on test. Every guard evaluation is reported to the trial as
it appears in `guard.jsonl`; the median pruner stops (SIGTERM) a trial whose curve is below the median of earlier
trials at the same evaluation. Trial 0 is the recipe's own values (`start_from_recipe`), so the best trial is
never worse on validation than the recipe it started from.

The study lives in `study.db` (Optuna's SQLite storage): a stopped tuner resumes where it stopped; a trial left
running by a killed tuner is marked failed. Written beside it: `best.yaml` (the recipe with the best values; its
header records the study), `trials.md` / `trials.csv` (every trial: state, value, values, CPU seconds) and
`trials.png` (value per trial and best so far).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlrec.config import dump_config, from_dict, load_config, set_dotted, to_dict
from rlrec.errors import ConfigError, RlrecError
from rlrec.ownership import child_environment, hold_run
from rlrec.pipeline import run_pipeline, signal_tree, stage_command
from rlrec.recipe import ORDER, Recipe, stage_needs

TUNED_STAGES = ("sft", "grpo", "dpo")


@dataclass
class ParamSpace:
    """One searched key: `choices`, or a range `low`..`high` (log-uniform with `log`; integers when low, high and
    `step` are integers)."""

    low: int | float | None = None  # int first: `low: 5` stays an integer
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    choices: list[Any] | None = None

    def __post_init__(self) -> None:
        if self.choices is not None:
            if not self.choices or self.low is not None or self.high is not None:
                raise ConfigError("a param has either a non-empty `choices` list or `low` and `high`, not both")
            return
        if self.low is None or self.high is None or not self.low < self.high:
            raise ConfigError(f"a param range needs low < high, got low={self.low} high={self.high}")
        if self.log and self.low <= 0:
            raise ConfigError(f"a log range needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ConfigError("a param range is either `log` or stepped (`step`), not both")

    @property
    def integer(self) -> bool:
        return all(isinstance(v, int) for v in (self.low, self.high)) and (self.step is None or
                                                                           isinstance(self.step, int))  # fmt: skip

    def distribution(self):
        import optuna

        if self.choices is not None:
            return optuna.distributions.CategoricalDistribution(self.choices)
        if self.integer:
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log,
                                                        step=int(self.step or 1))  # fmt: skip
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log, step=self.step)


@dataclass
class SamplerConfig:
    kind: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    startup_trials: int = 5  # TPE: random trials before the model of good and bad values takes over


@dataclass
class PrunerConfig:
    enabled: bool = True
    startup_trials: int = 3  # completed trials before any is pruned
    warmup_evaluations: int = 1  # guard evaluations of a trial before it can be pruned


@dataclass
class TuneSpace:
    stage: Literal["sft", "grpo", "dpo"]
    params: dict[str, ParamSpace]
    recipe: str | None = None  # the recipe to tune, when --config is not given
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    start_from_recipe: bool = True  # trial 0: the recipe's own values
    enqueue: list[dict[str, Any]] = field(default_factory=list)  # further trials to run first, as key -> value

    def __post_init__(self) -> None:
        if not self.params:
            raise ConfigError("params: name at least one recipe key to search")
        for key in self.params:
            if not key.startswith(f"{self.stage}."):
                raise ConfigError(f"params.{key}: a {self.stage} study searches {self.stage}.* keys only (another "
                                  "stage's keys would need that stage rerun for every trial)")  # fmt: skip


# --- budgets and recipes --------------------------------------------------------------------------------------------


def parse_budget(text: str) -> tuple[str, float]:
    """`20` -> ("trials", 20); `3600s` -> ("cpu_seconds", 3600)."""
    value = text.strip()
    unit = "cpu_seconds" if value.endswith("s") else "trials"
    number = value[:-1] if unit == "cpu_seconds" else value
    try:
        amount = float(number) if unit == "cpu_seconds" else int(number)
    except ValueError:
        raise ConfigError(f"--budget: expected a number of trials (20) or CPU-seconds (3600s), got {text!r}") from None
    if not amount > 0 or not math.isfinite(amount):
        raise ConfigError(f"--budget: expected a positive budget, got {text!r}")
    return unit, amount


def _get(raw: dict, key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def with_values(base: Recipe, values: dict[str, Any]) -> dict:
    """The base recipe (as a dict) with `values` set at their dotted keys; checked strictly as a recipe."""
    raw = to_dict(base)
    for key, value in values.items():
        set_dotted(raw, key, value)
    from_dict(Recipe, raw)  # an unknown key or a value out of range fails here, naming the key
    return raw


def trial_recipe(base: Recipe, space: TuneSpace, values: dict[str, Any], trials_dir: Path, number: int) -> dict:
    raw = with_values(base, values)
    raw.update(name=f"t{number:03d}", output_dir=str(trials_dir))
    raw[space.stage]["eval_splits"] = []  # the guard's validation is the objective; test is never scored here
    guard = "select" if space.stage == "sft" else "guard"
    if isinstance(raw[space.stage].get(guard), dict):
        raw[space.stage][guard]["shadow_split"] = None
    return raw


# --- one trial ------------------------------------------------------------------------------------------------------


def _guard_curve(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _objective(curve: list[dict], metric: str, keep_best: bool) -> float | None:
    """What the guard chose on: the best (or, keeping the last weights, the last) value, smoothed when it was."""
    values = [entry.get("smoothed", entry[metric]) for entry in curve]
    if not values:
        return None
    return max(values) if keep_best else values[-1]


def run_trial(study, trial, space: TuneSpace, base: Recipe, trials_dir: Path) -> dict:
    """Run one trial's stage as a process, report each guard evaluation, prune when the pruner says so; tell the
    study the outcome. Returns the trial's row."""
    import optuna

    values = dict(trial.params)
    raw = trial_recipe(base, space, values, trials_dir, trial.number)
    recipe = from_dict(Recipe, raw)
    run_dir = recipe.run_dir
    link_needs(base, recipe, space.stage)
    recipe_file = run_dir / "recipe.yaml"
    dump_config(recipe, recipe_file)
    guard = recipe.sft.select if space.stage == "sft" else recipe.section(space.stage).guard
    metric = f"ndcg@{guard.k}"
    command = stage_command(space.stage, recipe_file, base.pipeline)
    cpu_before = _children_cpu()
    started = time.time()
    pruned = False
    with (run_dir / f"{space.stage}.log").open("w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_environment())
        reported = 0
        try:
            while process.poll() is None:
                time.sleep(1.0)
                curve = _guard_curve(recipe.stage_dir(space.stage) / "guard.jsonl")
                for entry in curve[reported:]:
                    trial.report(entry.get("smoothed", entry[metric]), reported)
                    reported += 1
                    if space.pruner.enabled and trial.should_prune():
                        pruned = True
                if pruned:
                    signal_tree(process.pid, signal.SIGTERM)
                    process.wait()
            for entry in _guard_curve(recipe.stage_dir(space.stage) / "guard.jsonl")[reported:]:  # after the end
                trial.report(entry.get("smoothed", entry[metric]), reported)
                reported += 1
        except BaseException:  # the tuner is stopped: stop the trial too, and leave it to be marked failed
            signal_tree(process.pid, signal.SIGTERM)
            process.wait()
            raise
    cpu_seconds = round(_children_cpu() - cpu_before, 1)
    curve = _guard_curve(recipe.stage_dir(space.stage) / "guard.jsonl")
    value = _objective(curve, metric, guard.keep_best)
    trial.set_user_attr("cpu_seconds", cpu_seconds)
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("evaluations", len(curve))
    if pruned:
        state, told = "pruned", optuna.trial.TrialState.PRUNED
        study.tell(trial, state=told)
    elif process.returncode != 0 or value is None:
        state = "failed"
        tail = (run_dir / f"{space.stage}.log").read_text(encoding="utf-8", errors="replace").splitlines()[-3:]
        print(f"rlrec tune: trial {trial.number} failed (exit {process.returncode}): {' | '.join(tail)}",
              file=sys.stderr, flush=True)  # fmt: skip
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    else:
        state = "complete"
        study.tell(trial, value)
    print(f"rlrec tune: trial {trial.number} {state}: valid {metric} "
          f"{'-' if value is None else f'{value:.4f}'} ({len(curve)} evaluations, {cpu_seconds:,.0f} CPU-s, "
          f"{time.time() - started:,.0f} s) {values}", flush=True)  # fmt: skip
    return {"number": trial.number, "state": state, "value": value, "params": values, "cpu_seconds": cpu_seconds}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def link_needs(base: Recipe, trial: Recipe, stage: str) -> None:
    """The trial reads the base run's outputs of the stages its stage needs (prepared data; the SFT model and
    SASRec for GRPO/DPO) through symlinks."""
    trial.run_dir.mkdir(parents=True, exist_ok=True)
    for need in _all_needs(base, stage):
        source, link = base.stage_dir(need).resolve(), trial.stage_dir(need)
        if not source.is_dir():
            raise RlrecError(f"{source}: missing; the {stage} trials read it")
        if not link.exists():
            link.symlink_to(source, target_is_directory=True)


def _all_needs(recipe: Recipe, stage: str) -> list[str]:
    needs: list[str] = []
    for need in stage_needs(recipe, stage):
        needs += [n for n in [*_all_needs(recipe, need), need] if n not in needs]
    return needs


# --- the study ------------------------------------------------------------------------------------------------------


def run_tune(config_path: str | None, space_path: str, budget: str, overrides: list[str] | None = None) -> dict:
    """Run (or resume) the study; return its summary (also written beside it)."""
    import optuna

    space = load_config(TuneSpace, space_path)
    config_path = config_path or space.recipe
    if config_path is None:
        raise ConfigError(f"{space_path}: name the recipe (recipe: recipes/...yaml) or pass --config")
    unit, amount = parse_budget(budget)
    base = load_config(Recipe, config_path, overrides or [])
    base.section(space.stage)
    if space.stage == "sft" and base.sft.select is None:
        raise ConfigError(f"{config_path}: sft.select (the validation guard) is the tuner's objective; set it")
    for key, param in space.params.items():  # every key and both ends of every range are valid recipe values
        probes = param.choices if param.choices is not None else [param.low, param.high]
        for value in probes:
            with_values(base, {key: int(value) if param.integer and param.choices is None else value})
    out = base.run_dir / "tune" / Path(space_path).stem
    with hold_run(base.run_dir, f"rlrec tune --space {space_path}"):
        needs = _all_needs(base, space.stage)
        if needs and not all((base.stage_dir(n) / "manifest.json").is_file() for n in needs):
            last = max(needs, key=ORDER.index)
            print(f"rlrec tune: running the pipeline up to {last} (the trials read {', '.join(needs)})", flush=True)
            run_pipeline(base, until=last)
        out.mkdir(parents=True, exist_ok=True)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            study_name=out.name, storage=f"sqlite:///{out / 'study.db'}", direction="maximize", load_if_exists=True,
            sampler=_sampler(space.sampler), pruner=_pruner(space.pruner),
        )  # fmt: skip
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            print(f"rlrec tune: trial {trial.number} was left running by a stopped tuner; marked failed", flush=True)
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        if not study.trials:
            _enqueue_first(study, space, base)
        distributions = {key: param.distribution() for key, param in space.params.items()}
        print(f"rlrec tune: {space.stage} on {base.name}, {len(space.params)} keys, budget {amount:g} "
              f"{unit.replace('_', ' ')}, {len(trial_rows(study))} trials run before -> {out}", flush=True)  # fmt: skip
        while not _spent(study, unit, amount):
            trial = study.ask(distributions)
            run_trial(study, trial, space, base, out / "trials")
        summary = write_study(study, space, base, config_path, space_path, out)
    return summary


def _sampler(config: SamplerConfig):
    import optuna

    if config.kind == "random":
        return optuna.samplers.RandomSampler(seed=config.seed)
    return optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=config.startup_trials)


def _pruner(config: PrunerConfig):
    import optuna

    if not config.enabled:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=config.startup_trials,
                                       n_warmup_steps=config.warmup_evaluations)  # fmt: skip


def _enqueue_first(study, space: TuneSpace, base: Recipe) -> None:
    raw = to_dict(base)
    if space.start_from_recipe:
        current = {key: _get(raw, key) for key in space.params}
        inside = {k: v for k, v in current.items() if v is not None and _contains(space.params[k], v)}
        if len(inside) < len(current):
            outside = sorted(set(current) - set(inside))
            print(f"rlrec tune: the recipe's values of {outside} are outside the space; trial 0 samples them",
                  flush=True)  # fmt: skip
        study.enqueue_trial(inside)
    for values in space.enqueue:
        unknown = sorted(set(values) - set(space.params))
        if unknown:
            raise ConfigError(f"enqueue: {unknown} are not searched keys (params: {sorted(space.params)})")
        study.enqueue_trial(values)


def _contains(param: ParamSpace, value: Any) -> bool:
    if param.choices is not None:
        return value in param.choices
    return isinstance(value, (int, float)) and param.low <= value <= param.high


def _spent(study, unit: str, amount: float) -> bool:
    import optuna

    finished = [t for t in study.trials if t.state != optuna.trial.TrialState.WAITING]
    if unit == "trials":
        return len(finished) >= amount
    return sum(t.user_attrs.get("cpu_seconds", 0.0) for t in finished) >= amount


# --- the study's files ----------------------------------------------------------------------------------------------


def trial_rows(study) -> list[dict]:
    rows = []
    for t in study.trials:
        if t.state.name == "WAITING":
            continue
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": dict(t.params),
                     "cpu_seconds": t.user_attrs.get("cpu_seconds"), "evaluations": t.user_attrs.get("evaluations"),
                     "run_dir": t.user_attrs.get("run_dir")})  # fmt: skip
    return rows


def write_study(study, space: TuneSpace, base: Recipe, config_path: str, space_path: str, out: Path) -> dict:
    rows = trial_rows(study)
    keys = list(space.params)
    complete = [r for r in rows if r["state"] == "complete"]
    best = max(complete, key=lambda r: r["value"]) if complete else None
    with (out / "trials.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", "state", "valid_value", *keys, "cpu_seconds", "evaluations"])
        for r in rows:
            writer.writerow([r["number"], r["state"], r["value"], *(r["params"].get(k) for k in keys),
                             r["cpu_seconds"], r["evaluations"]])  # fmt: skip
    lines = [f"| trial | state | valid NDCG | {' | '.join(keys)} | CPU-s |", "|---" * (len(keys) + 4) + "|"]
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']:.4f}"
        mark = " (best)" if best is not None and r["number"] == best["number"] else ""
        lines.append(f"| {r['number']}{mark} | {r['state']} | {value} | "
                     + " | ".join(_shown(r["params"].get(k, "-")) for k in keys)
                     + f" | {r['cpu_seconds'] if r['cpu_seconds'] is not None else '-'} |")  # fmt: skip
    (out / "trials.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plotted = _plot(rows, out / "trials.png")
    summary = {"stage": space.stage, "recipe": str(config_path), "out": str(out), "space": str(space_path),
               "trials": len(rows),
               "complete": len(complete), "pruned": sum(r["state"] == "pruned" for r in rows),
               "failed": sum(r["state"] == "failed" for r in rows),
               "cpu_seconds": round(sum(r["cpu_seconds"] or 0 for r in rows), 1),
               "best": best, "plot": plotted}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if best is not None:
        raw = with_values(base, best["params"])
        header = [f"# Tuned by `rlrec tune --config {config_path} --space {space_path}` ({time.strftime('%Y-%m-%d')}):",
                  f"# {summary['trials']} trials ({summary['complete']} complete, {summary['pruned']} pruned, "
                  f"{summary['failed']} failed), {summary['cpu_seconds']:,.0f} CPU-s; best: trial {best['number']}, "
                  f"validation {best['value']:.4f} (the {space.stage} guard's NDCG on its validation users).",
                  f"# Values: {json.dumps(best['params'])}. Study: {out / 'study.db'}; trials: {out / 'trials.md'}.",
                  "# Chosen on validation only; measure test once, with seeds, before reporting it."]  # fmt: skip
        (out / "best.yaml").write_text("\n".join(header) + "\n" + yaml.safe_dump(raw, sort_keys=False),
                                       encoding="utf-8")  # fmt: skip
    return summary


def _shown(value: Any) -> str:
    """A value as the table shows it: floats to 4 significant digits (trials.csv keeps them whole)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    done = [r for r in rows if r["value"] is not None]
    if not done:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for state, marker in (("complete", "o"), ("pruned", "x"), ("failed", "s")):
        points = [(r["number"], r["value"]) for r in done if r["state"] == state]
        if points:
            ax.scatter(*zip(*points, strict=True), marker=marker, label=state)
    best, line = -math.inf, []
    for r in sorted(rows, key=lambda r: r["number"]):
        if r["state"] == "complete" and r["value"] is not None:
            best = max(best, r["value"])
        line.append((r["number"], best if best > -math.inf else math.nan))
    ax.plot(*zip(*line, strict=True), color="gray", label="best so far")
    ax.set(xlabel="trial", ylabel="valid NDCG (guard)", title="rlrec tune")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend()
    fig.tight_layout()
    with contextlib.suppress(OSError):
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.is_file()


def report(summary: dict) -> list[str]:
    """What `rlrec tune` prints: the outcome and the trials' table."""
    out, best = Path(summary["out"]), summary["best"]
    lines = [f"wrote {out}: {summary['trials']} trials ({summary['complete']} complete, {summary['pruned']} pruned, "
             f"{summary['failed']} failed), {summary['cpu_seconds']:,.0f} CPU-s"]  # fmt: skip
    if best is not None:
        lines.append(
            f"best: trial {best['number']}, valid {best['value']:.4f}, {best['params']} -> {out / 'best.yaml'}"
        )
    lines.append((out / "trials.md").read_text(encoding="utf-8"))
    return lines
