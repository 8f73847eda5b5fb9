"""`rlrec`, the one entry point. Each command takes `--config <recipe.yaml>` plus overrides
(`--section.key value` or `section.key=value`), checked by the same strict schema as the file.

User errors (`RlrecError`: bad config, bad data, missing files) print one line to stderr and exit 2, without a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from rlrec.config import load_config
from rlrec.errors import RlrecError
from rlrec.recipe import Recipe


def _data_prepare(args: argparse.Namespace, overrides: list[str]) -> None:
    from rlrec.data.prepare import prepare

    recipe = load_config(Recipe, args.config, overrides)
    stats = prepare(recipe)
    out = recipe.stage_dir("data")
    splits = ", ".join(f"{name} {n:,}" for name, n in stats["splits"].items())
    interactions = "n/a (pre-split export)" if stats["num_interactions"] is None else f"{stats['num_interactions']:,}"
    print(f"wrote {out}")
    print(f"  users {stats['num_users']:,}  items {stats['num_items']:,}  interactions {interactions}")
    print(f"  {stats['protocol']} samples: {splits}")
    if stats["skipped"]:
        print(f"  skipped: {json.dumps(stats['skipped'])} (examples in stats.json)")


def _items_build(args: argparse.Namespace, overrides: list[str]) -> None:
    from rlrec.items.build import build

    recipe = load_config(Recipe, args.config, overrides)
    stats = build(recipe)
    before, after = stats["collisions_before"], stats["collisions_after"]
    first = stats["utilisation"][0]
    print(f"wrote {recipe.stage_dir('items')}")
    distinct = stats["distinct_identifiers"]
    print(f"  items {stats['num_items']:,}  levels {stats['levels']}  distinct identifiers {distinct:,}")
    print(
        f"  collisions: {before['colliding_items']:,} colliding items before, {after['colliding_items']} after "
        f"({stats['resolution']['method']}, {stats['resolution']['items_changed']} items changed)"
    )
    used = f"{first['codes_used']}/{first['codebook_size']}"
    print(f"  level {first['level']} utilisation: {used} codes ({first['share']:.1%})")


def _baseline(args: argparse.Namespace, overrides: list[str]) -> None:
    from rlrec.stages.evaluate import run_most_popular, run_sasrec

    recipe = load_config(Recipe, args.config, overrides)
    name = args.words[1]
    result = run_most_popular(recipe) if name == "most_popular" else run_sasrec(recipe)
    metrics = result["metrics"]
    print(f"wrote {recipe.stage_dir(name)}")
    print(f"  {name}: HR@10 {metrics['hr@10']:.4f}  NDCG@10 {metrics['ndcg@10']:.4f}  MRR@10 {metrics['mrr@10']:.4f}")
    if "training" in result:
        print(f"  training: {json.dumps(result['training'])}")


def _eval(args: argparse.Namespace, overrides: list[str]) -> None:
    from rlrec.stages.evaluate import run_eval

    recipe = load_config(Recipe, args.config, overrides)
    run_eval(recipe)
    out = recipe.stage_dir("eval")
    print(f"wrote {out}")
    print((out / "metrics.md").read_text())


def _print_stage_metrics(recipe: Recipe, stage: str, metrics: dict) -> None:
    print(f"wrote {recipe.stage_dir(stage)}")
    for split in ("valid", "test"):
        if split in metrics:
            m = metrics[split]["metrics"]
            print(
                f"  {split}: HR@10 {m['hr@10']:.4f}  NDCG@10 {m['ndcg@10']:.4f}  ({metrics[split]['num_users']} users)"
            )


def _sft(args: argparse.Namespace, overrides: list[str]) -> None:
    from rlrec.stages.sft import run

    recipe = load_config(Recipe, args.config, overrides)
    _print_stage_metrics(recipe, "sft", run(recipe))


def _grpo(args: argparse.Namespace, overrides: list[str]) -> None:
    from rlrec.stages.grpo import run

    recipe = load_config(Recipe, args.config, overrides)
    _print_stage_metrics(recipe, "grpo", run(recipe))


def _dpo(args: argparse.Namespace, overrides: list[str]) -> None:
    from rlrec.stages.dpo import run

    recipe = load_config(Recipe, args.config, overrides)
    _print_stage_metrics(recipe, "dpo", run(recipe))


def _pipeline(args: argparse.Namespace, overrides: list[str]) -> None:
    from rlrec.pipeline import run_pipeline

    run_pipeline(load_config(Recipe, args.config, overrides))


def _publish(args: argparse.Namespace, overrides: list[str]) -> None:
    from rlrec.publish import publish

    if overrides:
        raise RlrecError(f"rlrec publish: unexpected arguments {overrides}")
    folder = publish(args.stage, args.repo_id, private=args.private, dry_run=args.dry_run, out=args.out)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    print(f"wrote {folder} ({len(files)} files{', dry run: nothing pushed' if args.dry_run else ''})")


def _ablate(args: argparse.Namespace, overrides: list[str]) -> None:
    from rlrec.ablate import run_ablation

    run_ablation(args.config, args.grid, args.jobs, overrides)


COMMANDS: dict[tuple[str, ...], tuple[str, Callable[[argparse.Namespace, list[str]], None]]] = {
    ("data", "prepare"): ("interaction logs -> recommendation-as-text datasets in runs/<name>/data", _data_prepare),
    ("baseline", "most_popular"): ("score the most-popular baseline on the run's split", _baseline),
    ("baseline", "sasrec"): ("train SASRec with early stopping on valid NDCG@10, then score it", _baseline),
    ("eval",): ("full-catalogue evaluation of the run's model and baselines -> runs/<name>/eval", _eval),
    ("sft",): ("supervised fine-tuning (LoRA or full) on history -> next item, then evaluation", _sft),
    ("grpo",): ("GRPO from the SFT model with verifiable ranking rewards and trie-constrained rollouts", _grpo),
    ("dpo",): ("DPO or multi-negative S-DPO from the SFT model, with mined hard negatives", _dpo),
    ("pipeline",): ("items -> data -> baselines -> sft -> grpo/dpo -> eval, skipping finished stages", _pipeline),
    ("publish",): ("a trained stage -> Hugging Face Hub repo (adapter, tokenizer, catalogue, model card)", _publish),
    ("ablate",): ("GRPO / DPO once per (variant, seed) of a grid from the same SFT model, then a table", _ablate),
    ("items", "build"): ("item text -> collision-free semantic-ID index in runs/<name>/items", _items_build),
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
        cmd.add_argument("--config", required=True, help="recipe YAML")
        if words == ("ablate",):
            cmd.add_argument("--grid", help="grid YAML when --config is a recipe (else --config is the grid)")
            cmd.add_argument("--jobs", type=int, default=1, help="cells run at the same time")
        cmd.set_defaults(words=words)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    _, handler = COMMANDS[args.words]
    try:
        handler(args, overrides)
    except RlrecError as err:
        print(f"rlrec: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
