"""The parts every stage runs the same way: the training tail, the files a finished stage leaves, and the entry
point under `accelerate launch`.

A training stage (sft, grpo, dpo) reads top to bottom as
    trainer = build_trainer("grpo", out, lambda: GRPOTrainer(...))   # a set-up ValueError -> one-line RlrecError
    summary, saved_step = train_and_save(trainer, out, "grpo", "...what is trained...", resume, inputs, guard, ...)
    finish(recipe, "grpo", data, summary, config.eval_splits, config.eval_max_users, timer)
(`train_and_save`: the guard, `fit`'s banner, resume, training and train_log.jsonl, the best weights, the save).
and every stage, trained or not, ends with `write_outputs`: `metrics.json`, the resolved `config.yaml` and
`manifest.json` (inputs with hashes, versions, seed, wall time, peak memory) in `runs/<name>/<stage>/`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import torch

from rlrec.config import dump_config, load_config
from rlrec.data.prepared import RunData
from rlrec.decoding.inputs import ModelInputs
from rlrec.errors import RlrecError, run_reporting_errors
from rlrec.evaluate import eval_rows, evaluate_generative, sample_protocol, write_ranks
from rlrec.manifest import write_manifest
from rlrec.models import load_model
from rlrec.ownership import hold_run, watch_parent
from rlrec.recipe import Recipe
from rlrec.stages.posttrain import Policy, copy_base_model
from rlrec.training.arguments import checkpoint_step, is_main_process, last_checkpoint, trainable_parameters
from rlrec.training.guard import Guard
from rlrec.upstream import tensorboard_dir

T = TypeVar("T")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


class Timer:
    def __init__(self) -> None:
        self.start = time.time()

    @property
    def seconds(self) -> float:
        return round(time.time() - self.start, 1)


# --- the training tail ------------------------------------------------------------------------------------------------


def build_trainer(label: str, out: Path, build: Callable[[], T]) -> T:
    """Construct a TRL trainer; its TensorBoard logs go to `out/logs`, and a ValueError from set-up (PEFT's message
    when a target module is missing, for example) becomes a one-line error."""
    try:
        with tensorboard_dir(out / "logs"):
            return build()
    except ValueError as err:
        raise RlrecError(f"cannot set up {label.upper()}: {err}") from None


def fit(trainer, out: Path, label: str, details: str, resume: bool, inputs: dict) -> dict:
    """Resume from the stage's last complete checkpoint made from the same `inputs` (when `resume`; see
    last_checkpoint), print the banner, train, and write TRL's log to `out/train_log.jsonl`; return the summary
    every training stage records."""
    checkpoint = last_checkpoint(out, resume, inputs, label.split()[0])
    kind = trainer.accelerator.distributed_type.value
    if is_main_process():
        print(f"rlrec {label}: world size {world_size()} ({kind}), {details}, resume from {checkpoint or 'scratch'}",
              flush=True)  # fmt: skip
    cpu_started = time.process_time()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if is_main_process():
        with (out / "train_log.jsonl").open("w", encoding="utf-8") as log:
            for row in trainer.state.log_history:
                log.write(json.dumps(row) + "\n")
    return {
        "global_step": trainer.state.global_step, "train_loss": round(result.training_loss, 5),
        "resumed_from": checkpoint, "steps_run": trainer.state.global_step - checkpoint_step(checkpoint),
        "world_size": world_size(), "distributed_type": kind,
        "trainable_parameters": trainable_parameters(trainer.model),
        **training_rate(trainer, time.process_time() - cpu_started, checkpoint),
    }  # fmt: skip


def train_and_save(trainer, out: Path, label: str, details: str, resume: bool, inputs: dict, guard: Guard | None,
                   keep_best: bool, policy: Policy | None = None) -> tuple[dict, int]:  # fmt: skip
    """The tail every training stage ends with: attach the guard (when the stage has one), `fit`, keep the guard's
    best weights (or the last ones), save `out/model` (and, for an adapter on a from-scratch base, that base
    beside it), and wait for every process. Returns (fit's summary, the step whose weights were saved)."""
    if guard is not None:
        guard.attach(trainer)
    summary = fit(trainer, out, label, details, resume, inputs)
    saved_step = guard.restore_best() if guard is not None and keep_best else trainer.state.global_step
    # saved whole into a sibling, then renamed: a run killed while saving never leaves a `model/` that looks finished
    partial = out / ".model.partial"
    if is_main_process() and partial.exists():  # left by a run killed while saving: never mixed into this one
        shutil.rmtree(partial)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(partial))
    trainer.accelerator.wait_for_everyone()
    if is_main_process():
        if (out / "model").exists():  # this stage's own earlier model (the stage folder is the run's)
            shutil.rmtree(out / "model")
        os.replace(partial, out / "model")
    if policy is not None:
        copy_base_model(policy, out)
    trainer.accelerator.wait_for_everyone()
    return summary, saved_step


def training_rate(trainer, cpu_seconds: float, checkpoint: str | None) -> dict:
    """This process's CPU seconds of training (the guard's evaluations left out) and the tokens the trainer fed its
    model per CPU second: TRL's `num_tokens` (SFT and DPO: the batches' non-padding tokens; GRPO: prompt and
    completion tokens of every completion). A resumed run's token count starts before its CPU time: no rate."""
    guards = [c for c in trainer.callback_handler.callbacks if isinstance(c, Guard)]
    cpu_seconds -= sum(g.eval_cpu_seconds for g in guards)
    tokens = next((row["num_tokens"] for row in reversed(trainer.state.log_history) if "num_tokens" in row), None)
    rate = round(tokens / max(cpu_seconds, 1e-9), 1) if tokens is not None and checkpoint is None else None
    return {"train_cpu_seconds": round(cpu_seconds, 1), "tokens": tokens, "tokens_per_cpu_second": rate}


def finish(recipe: Recipe, stage: str, data: RunData, summary: dict, splits: Iterable[str],
           max_users: int | None, timer: Timer, inputs: ModelInputs | None = None) -> dict:  # fmt: skip
    """Evaluate the stage's saved model (reloaded: the artifact that is published) on `splits` (the run's
    evaluation users, `eval_rows`; the first `max_users` of them) and write the stage's files. `inputs`: the
    stage's prompt encoding and trie, when it built them (the saved tokenizer is the one they were built with)."""
    model, tokenizer = load_model(recipe.stage_dir(stage) / "model")
    return evaluate_stage(recipe, stage, model, tokenizer, data, summary, splits, max_users, timer, inputs)


def evaluate_stage(recipe: Recipe, stage: str, model, tokenizer, data: RunData, summary: dict, splits: Iterable[str],
                   max_users: int | None, timer: Timer, inputs: ModelInputs | None = None) -> dict:  # fmt: skip
    """Score `model` on `splits` and write `<stage>/metrics.json`, `ranks.json`, config.yaml and manifest.json."""
    eval_config, splits = recipe.eval, list(splits)
    # the same protocol fields as the baselines' reports (bench/results.py refuses to mix protocols)
    protocol = {
        **data.protocol,
        "split": ",".join(splits),
        "exclude_history": eval_config.exclude_history,
        "beam_width": eval_config.beam_width,
        "ks": list(eval_config.ks),
        **sample_protocol(eval_config),
    }
    metrics, ranks = {"protocol": protocol, "training": summary}, {}
    for split in splits:
        rows = eval_rows(data, split, eval_config, max_users)
        result = evaluate_generative(model, tokenizer, data, eval_config, rows, inputs)
        ranks[split] = (rows, {stage: result.pop("ranks")})
        metrics[split] = {**result, "num_users": len(rows)}
    write_ranks(recipe.stage_dir(stage), ranks)
    write_outputs(recipe, stage, [data.path / "dataset"], timer, metrics)
    return metrics


def write_outputs(recipe: Recipe, stage: str, inputs: list, timer: Timer, metrics: dict | None = None) -> None:
    """What every finished stage leaves in `runs/<name>/<stage>/`: metrics.json (when given; the baselines write a
    report of their own), the resolved config.yaml and manifest.json."""
    out = recipe.stage_dir(stage)
    out.mkdir(parents=True, exist_ok=True)
    if metrics is not None:
        write_json(out / "metrics.json", metrics)
    dump_config(recipe, out / "config.yaml")
    write_manifest(out, inputs, recipe.seed, timer.seconds, stage=stage)


def policy_report(recipe: Recipe, stage: str, metrics: dict) -> list[str]:
    """What `rlrec sft|grpo|dpo` prints: HR@10 and NDCG@10 of each evaluated split."""
    lines = [f"wrote {recipe.stage_dir(stage)}"]
    for split in ("valid", "test"):
        if split in metrics:
            m = metrics[split]["metrics"]
            lines.append(f"  {split}: HR@10 {m['hr@10']:.4f}  NDCG@10 {m['ndcg@10']:.4f}  "
                         f"({metrics[split]['num_users']} users)")  # fmt: skip
    return lines


# --- entry point ------------------------------------------------------------------------------------------------------


def finish_distributed() -> None:
    """End a multi-process run cleanly. About 1 in 10 two-process CPU runs aborted at interpreter shutdown after
    finishing ("terminate called without an active exception", exit 1; root cause unknown); leaving with
    os._exit(0) once everything is flushed and saved gave 0 failures in 24 runs."""
    if world_size() <= 1:
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def stage_main(prog: str, run: Callable[[Recipe], object], argv: list[str] | None) -> int:
    """`[accelerate launch] -m rlrec.stages.<x> --config <recipe> [overrides]`: run the stage, print an RlrecError as
    one line (exit 2; 130 / 143 when SIGINT / SIGTERM stop it), and leave the process group cleanly (see
    finish_distributed)."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--config", required=True)
    args, overrides = parser.parse_known_args(argv)
    watch_parent()  # launched by `rlrec pipeline`: stop when it is gone

    def body() -> None:
        recipe = load_config(Recipe, args.config, overrides)
        with hold_run(recipe.run_dir, f"{prog} --config {args.config}"):
            run(recipe)

    code = run_reporting_errors(body)
    if code == 0:
        finish_distributed()
    return code
