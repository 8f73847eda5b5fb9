"""`rlrec pipeline`: one recipe from interaction logs to an evaluated recommender, resumable.

    rlrec pipeline --config recipes/quickstart.yaml [--sft.train.epochs 2 ...]

Stages run in the one order of `rlrec.recipe.STAGES`, each in its own folder of `runs/<name>/`:
items (when the recipe has an `items` section) -> data -> most_popular -> sasrec (when `sasrec`) -> sft -> grpo ->
dpo (each when its section exists) -> eval. Each stage is the module `rlrec.stages.<stage>` and its `run(recipe)`.
Data, items, baselines and eval run in this process; the training stages (sft, grpo, dpo) run as
`accelerate launch --config_file <pipeline.accelerate_config> -m rlrec.stages.<x>` subprocesses on the resolved
recipe (`runs/<name>/recipe.yaml`), so one recipe scales from a CPU to N GPUs by changing one line.

Skipping and resuming (the make / DVC idea, with keys instead of timestamps): every stage has a key, the hash of
the recipe sections it reads and of the inputs of the stages it needs (the stage graph of `rlrec.recipe`: SFT needs
data; GRPO needs its init policy and, for a `teacher` reward, SASRec; ...). A finished stage records its key in its
`manifest.json`; a re-run skips a stage whose manifest holds the current key. A stage that started with the same
key but did not finish (killed, crashed) runs again and its trainer resumes from the last checkpoint. A stage whose
key changed (a section it reads, or a stage it needs, changed) is cleared and re-run, and so is every stage that
needs it; its siblings are kept.
At the end, `runs/<name>/summary.md` tabulates every stage's test HR@10 / NDCG@10 / valid rate.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from rlrec.config import dump_config
from rlrec.errors import ConfigError, RlrecError, Stopped
from rlrec.metrics import COLD_MAX_COUNT
from rlrec.ownership import PIPELINE_KEY, child_environment
from rlrec.recipe import ORDER, STAGE, PipelineConfig, Recipe, stage_inputs


def stage_keys(recipe: Recipe, stages: list[str]) -> dict[str, str]:
    """Each stage's key: a hash of its inputs (rlrec.recipe.stage_inputs), which hold the sections it reads and the
    inputs of the stages it needs, so a change reruns the stages that read it and those downstream, never a
    sibling (a SASRec edit keeps SFT; a GRPO edit keeps a DPO that starts from SFT)."""
    return {stage: hashlib.sha256(json.dumps(stage_inputs(recipe, stage), sort_keys=True, default=str).encode())
            .hexdigest()[:16] for stage in stages}  # fmt: skip


def stage_state(folder: Path, key: str) -> str:
    """`done` (finished with this key), `resume` (started with this key), `stale` (ours, other key), `foreign`
    (a folder the pipeline did not make, e.g. from a manual `rlrec sft`), or `new`."""
    manifest = folder / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("pipeline_key") == key:
        return "done"
    marker = folder / PIPELINE_KEY
    if marker.is_file():
        return "resume" if marker.read_text().strip() == key else "stale"
    return "foreign" if folder.exists() and any(folder.iterdir()) else "new"


def _mark_done(folder: Path, key: str, seconds: float) -> None:
    """Record the key in the stage's manifest (stages write their own; a stage without one gets a small one)."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {"stage": folder.name}
    manifest.update(pipeline_key=key, pipeline_wall_time_s=round(seconds, 1))
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def stage_command(stage: str, recipe_file: Path, config: PipelineConfig) -> list[str]:
    """The command that runs a training stage as its own process: `python -m rlrec.stages.<stage>`, or under
    `accelerate launch` with `pipeline.accelerate_config` (DDP, DeepSpeed, FSDP; one or many processes)."""
    module = f"rlrec.stages.{stage}"
    if config.launcher == "python":
        return [sys.executable, "-m", module, "--config", str(recipe_file)]
    accelerate_config = Path(config.accelerate_config)
    if not accelerate_config.is_file():
        raise ConfigError(f"pipeline.accelerate_config: {accelerate_config} does not exist (cwd {Path.cwd()})")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
            "-m", module, "--config", str(recipe_file)]  # fmt: skip


def _launch(stage: str, recipe_file: Path, config: PipelineConfig) -> None:
    command = stage_command(stage, recipe_file, config)
    print(f"rlrec pipeline: {' '.join(command[2:] if config.launcher == 'accelerate' else command)}", flush=True)
    code, stopped_by = run_child(command)
    if stopped_by == signal.SIGINT:
        raise KeyboardInterrupt
    if stopped_by is not None:
        raise Stopped(stopped_by.name)
    if code != 0:
        raise RlrecError(f"stage {stage} failed (exit code {code}); rerun the pipeline to resume it")


def signal_tree(pid: int, signum: int) -> None:
    """Send `signum` to a process and every process under it (a launcher and its ranks)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signum)


def run_child(command: list[str]) -> tuple[int, signal.Signals | None]:
    """Run a training stage and stop all of it when the pipeline is stopped: `timeout` and schedulers send SIGTERM to
    the pipeline's process alone, so it is passed on to the launcher and every process under it (the trainer), or
    the trainer would keep writing checkpoints into the folder a rerun resumes from. The child stays in the
    pipeline's process group, so Ctrl-C in a terminal and a kill of the whole group reach it directly (SIGINT is
    therefore not passed on again). Returns the exit code and the signal that stopped the pipeline, if one did."""
    child = subprocess.Popen(command, env=child_environment())  # the child stops when this process is gone
    received: list[signal.Signals] = []

    def forward(signum, _frame) -> None:
        received.append(signal.Signals(signum))
        if signum == signal.SIGTERM:
            signal_tree(child.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait(), (received[0] if received else None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_pipeline(recipe: Recipe, until: str | None = None) -> str:
    """Run (or skip, or resume) every planned stage (up to `until`, inclusive); return the summary table (also in
    runs/<name>/summary.md)."""
    config = recipe.pipeline
    stages = recipe.planned_stages()
    if until is not None:
        stages = [s for s in stages if ORDER.index(s) <= ORDER.index(until)]
    launched = [s for s in stages if STAGE[s].launched]
    if launched and config.launcher == "accelerate" and not Path(config.accelerate_config).is_file():
        raise ConfigError(f"pipeline.accelerate_config: {config.accelerate_config} does not exist (cwd {Path.cwd()}); "
                          f"the stages {launched} run under it")  # checked before any stage runs  # fmt: skip
    keys = stage_keys(recipe, stages)
    recipe.run_dir.mkdir(parents=True, exist_ok=True)
    recipe_file = recipe.run_dir / "recipe.yaml"
    dump_config(recipe, recipe_file)
    started = time.time()
    for stage in stages:  # a stage's key covers the stages it needs: once one re-runs, its dependents do too
        folder = recipe.stage_dir(stage)
        state = stage_state(folder, keys[stage])
        if state == "done":
            print(f"rlrec pipeline: {stage}: up to date, skipped", flush=True)
            continue
        if state == "stale":
            print(f"rlrec pipeline: {stage}: inputs changed, clearing {folder}", flush=True)
            shutil.rmtree(folder)
        elif state == "foreign":
            aside = folder.with_name(f"{folder.name}.before-pipeline-{time.strftime('%Y%m%d-%H%M%S')}")
            print(f"rlrec pipeline: {stage}: {folder} was not made by the pipeline; moved to {aside}", flush=True)
            folder.rename(aside)
        elif state == "resume":
            print(f"rlrec pipeline: {stage}: unfinished run with the same inputs, resuming", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PIPELINE_KEY).write_text(keys[stage] + "\n")
        print(f"rlrec pipeline: {stage}: running", flush=True)
        stage_started = time.time()
        if STAGE[stage].launched:
            _launch(stage, recipe_file, config)
        else:
            importlib.import_module(f"rlrec.stages.{stage}").run(recipe)
        _mark_done(folder, keys[stage], time.time() - stage_started)
    summary = summary_table(recipe, stages)
    (recipe.run_dir / "summary.md").write_text(summary, encoding="utf-8")
    print(f"rlrec pipeline: finished in {time.time() - started:.0f} s; {recipe.run_dir / 'summary.md'}:\n")
    print(summary)
    return summary


def _test_metrics(folder: Path) -> tuple[dict, dict] | None:
    """(metrics, protocol) of a stage's test split, from the stage's own metrics.json."""
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    if "test" in payload and "metrics" in payload["test"]:  # training stages
        return payload["test"]["metrics"], payload.get("protocol", {})
    results = payload.get("results", {})  # baseline reports: {"results": {name: {"metrics": ...}}}
    if payload.get("protocol", {}).get("split") == "test" and len(results) == 1:
        return next(iter(results.values()))["metrics"], payload.get("protocol", {})
    return None


def summary_table(recipe: Recipe, stages: list[str]) -> str:
    rows = []
    for stage in stages:
        if not STAGE[stage].scored:
            continue
        found = _test_metrics(recipe.stage_dir(stage))
        if found is None:
            continue
        metrics, protocol = found
        rows.append((stage, metrics, protocol))
    if not rows:
        return "(no stage has test metrics)\n"
    protocol = rows[0][2]
    lines = [
        f"Run `{recipe.name}`, test split, protocol: {protocol.get('split_method', '?')}, "
        f"{protocol.get('candidates', 'full catalogue')} ({protocol.get('num_items', '?')} items).",
        "",
        "| stage | HR@10 | NDCG@10 | cold NDCG@10 | valid rate | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for stage, metrics, _ in rows:
        valid = metrics.get("valid_rate")
        manifest = recipe.stage_dir(stage) / "manifest.json"
        seconds = json.loads(manifest.read_text()).get("pipeline_wall_time_s") if manifest.is_file() else None
        valid_text = "-" if valid is None else f"{valid:.3f}"
        wall_text = "-" if seconds is None else f"{seconds:.0f} s"
        cold = metrics.get("cold_ndcg@10")
        cold_text = "-" if cold is None else f"{cold:.4f} ({metrics['cold_users']})"
        lines.append(f"| {stage} | {metrics['hr@10']:.4f} | {metrics['ndcg@10']:.4f} | {cold_text} | {valid_text} "
                     f"| {wall_text} |")  # fmt: skip
    lines.append(f"\nCold: users whose test item has at most {COLD_MAX_COUNT} training interactions (their count).")
    return "\n".join(lines) + "\n"
