"""Paired comparison of two systems on the same test users: per-user HR@10 / NDCG@10 differences with a 95%
bootstrap interval (rlrec.metrics.paired_bootstrap). A system is a generative model folder (`runs/x/sft/model`;
its prompt format is read from the stage's config.yaml beside it), a SASRec stage folder (`runs/x/sasrec`, with
model.pt), or `most_popular`.

    python bench/paired.py --data runs/ml100k-id/data --a runs/ml100k-id/sft/model --b most_popular
    python bench/paired.py --data runs/x/data --a runs/x/grpo/model --b runs/x/sft/model --split test
    python bench/paired.py --data runs/x/data --a runs/x/sft/model --b runs/x/sasrec

Protocol: the run's split, full catalogue, constrained beam of width 20 for generative models, all items scored
for SASRec and most-popular; history items are not excluded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from rlrec.baselines import load_sasrec, most_popular_lists, sasrec_lists
from rlrec.config import from_dict
from rlrec.data.prepared import load_run_data
from rlrec.decoding import recommend
from rlrec.decoding.inputs import ModelInputs
from rlrec.metrics import hit_at_k, ndcg_at_k, paired_bootstrap, rank_of
from rlrec.models import load_model
from rlrec.schema import DataConfig, SASRecConfig


def top_lists(system: str, data, rows, k: int) -> list[list[str]]:
    if system == "most_popular":
        return most_popular_lists(data, len(rows), k)
    path = Path(system)
    if (path / "model.pt").is_file():  # a SASRec stage folder
        recipe = yaml.safe_load((path / "config.yaml").read_text())
        model = load_sasrec(path, from_dict(SASRecConfig, recipe.get("sasrec") or {}))
        return sasrec_lists(model, data, rows, k, exclude_history=False)
    model, tokenizer = load_model(path)
    config = path.parent / "config.yaml"  # the stage's resolved recipe says how the model reads a history
    prompt = from_dict(DataConfig, yaml.safe_load(config.read_text())["data"]).prompt if config.is_file() else None
    inputs = ModelInputs.build(tokenizer, data.identifiers, prompt or data.prompt)
    recs = recommend(model, tokenizer, inputs.prompt_ids(tokenizer, rows), k=k, trie=inputs.trie,
                     beam_width=max(k, 20), batch_size=32)  # fmt: skip
    return [[item for item, _ in rec] for rec in recs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--a", required=True)
    parser.add_argument("--b", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_run_data(args.data)
    rows = data.rows(args.split)
    ranks = {name: [rank_of(t, lst) for t, lst in zip(rows["target"], top_lists(name, data, rows, args.k), strict=True)]
             for name in (args.a, args.b)}  # fmt: skip
    print(f"{args.split}: {len(rows)} users, a = {args.a}, b = {args.b}")
    for metric, fn in ((f"HR@{args.k}", hit_at_k), (f"NDCG@{args.k}", ndcg_at_k)):
        a = [fn(r, args.k) for r in ranks[args.a]]
        b = [fn(r, args.k) for r in ranks[args.b]]
        mean, low, high = paired_bootstrap(a, b)
        print(f"  {metric}: a {sum(a) / len(a):.4f}  b {sum(b) / len(b):.4f}  a-b {mean:+.4f}  "
              f"95% CI [{low:+.4f}, {high:+.4f}]")  # fmt: skip


if __name__ == "__main__":
    main()
