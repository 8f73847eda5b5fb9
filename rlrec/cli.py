"""`rlrec`, the one entry point. Each command takes `--config <recipe.yaml>` plus overrides
(`--section.key value` or `section.key=value`), checked by the same strict schema as the file.

User errors (`RlrecError`: bad config, bad data, missing files) print one line to stderr and exit 2, without a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from rlrec.ablate import run_ablation
from rlrec.config import load_config
from rlrec.errors import RlrecError, run_reporting_errors
from rlrec.ownership import MARKER, hold_run, watch_parent
from rlrec.pipeline import run_pipeline
from rlrec.recipe import STAGES, Recipe

# The modules that need torch and TRL (the stages, publishing) are imported by name when their command runs, so
# that `rlrec --help` and a config error answer at once.


def _stage(args: argparse.Namespace, overrides: list[str]) -> None:
    """A stage command: `rlrec.stages.<stage>.run(recipe)`, then print what the stage's `report` says."""
    recipe = load_config(Recipe, args.config, overrides)  # a recipe error answers before torch is imported
    recipe.check()
    stage = importlib.import_module(f"rlrec.stages.{args.stage_module}")
    with hold_run(recipe.run_dir, f"rlrec {' '.join(args.words)} --config {args.config}"):
        print("\n".join(stage.report(recipe, stage.run(recipe))))


def _pipeline(args: argparse.Namespace, overrides: list[str]) -> None:
    recipe = load_config(Recipe, args.config, overrides)
    recipe.check()
    with hold_run(recipe.run_dir, f"rlrec pipeline --config {args.config}"):
        run_pipeline(recipe)


def _publish(args: argparse.Namespace, overrides: list[str]) -> None:
    if overrides:
        raise RlrecError(f"rlrec publish: unexpected arguments {overrides}")
    publish = importlib.import_module("rlrec.publish").publish
    folder = publish(args.stage, args.repo_id, private=args.private, dry_run=args.dry_run, out=args.out)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MARKER)
    print(f"wrote {folder} ({len(files)} files{', dry run: nothing pushed' if args.dry_run else ''})")


def _ablate(args: argparse.Namespace, overrides: list[str]) -> None:
    run_ablation(args.config, args.grid, args.jobs, overrides)


def _tune(args: argparse.Namespace, overrides: list[str]) -> None:
    tune = importlib.import_module("rlrec.tune")  # Optuna is imported only when tuning
    print("\n".join(tune.report(tune.run_tune(args.config, args.space, args.budget, overrides))))


Handler = Callable[[argparse.Namespace, list[str]], None]
# command words -> (help, the stage it runs, or a handler of its own)
COMMANDS: dict[tuple[str, ...], tuple[str, str | Handler]] = {
    **{stage.words: (stage.help, stage.name) for stage in STAGES},  # every stage is a command of its own
    ("pipeline",): ("items -> data -> baselines -> sft -> grpo/dpo -> eval, skipping finished stages", _pipeline),
    ("publish",): ("a trained stage -> Hugging Face Hub repo (adapter, tokenizer, catalogue, model card)", _publish),
    ("ablate",): ("GRPO / DPO once per (variant, seed) of a grid from the same SFT model, then a table", _ablate),
    ("tune",): ("search a stage's settings on validation (Optuna TPE + median pruning on the guard)", _tune),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlrec", description="Post-train a language model into a recommender.")
    groups = parser.add_subparsers(dest="group", required=True, metavar="command")
    subparsers: dict[str, argparse._SubParsersAction] = {}
    for words, (help_text, _) in COMMANDS.items():
        if len(words) == 1:
            cmd = groups.add_parser(words[0], help=help_text)
        else:
            if words[0] not in subparsers:
                group = groups.add_parser(words[0], help=f"{words[0]} commands")
                subparsers[words[0]] = group.add_subparsers(dest="action", required=True, metavar="action")
            cmd = subparsers[words[0]].add_parser(words[1], help=help_text)
        if words == ("publish",):
            cmd.add_argument("stage", help="a finished stage folder, e.g. runs/<name>/grpo")
            cmd.add_argument("--repo-id", required=True, help="user/name on the Hub")
            cmd.add_argument("--private", action="store_true", help="create the repo as private")
            cmd.add_argument("--dry-run", action="store_true", help="only write the folder; push nothing")
            cmd.add_argument("--out", help="folder to write (default runs/<name>/publish/<stage>)")
            cmd.set_defaults(words=words)
            continue
        if words == ("tune",):
            cmd.add_argument("--config", help="recipe YAML (default: the space's `recipe`)")
            cmd.add_argument("--space", required=True, help="search space YAML (stage, params, sampler, pruner)")
            cmd.add_argument("--budget", required=True, help="trials (20) or CPU-seconds of the trials (3600s)")
            cmd.set_defaults(words=words, stage_module=None)
            continue
        cmd.add_argument("--config", required=True, help="recipe YAML")
        if words == ("ablate",):
            cmd.add_argument("--grid", help="grid YAML when --config is a recipe (else --config is the grid)")
            cmd.add_argument("--jobs", type=int, default=1, help="cells run at the same time")
        target = COMMANDS[words][1]
        cmd.set_defaults(words=words, stage_module=target if isinstance(target, str) else None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    watch_parent()  # a command launched by `rlrec ablate` or a pipeline stops when its launcher is gone
    _, target = COMMANDS[args.words]
    handler = _stage if isinstance(target, str) else target
    return run_reporting_errors(lambda: handler(args, overrides))


if __name__ == "__main__":
    sys.exit(main())
