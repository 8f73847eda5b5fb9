"""Paired comparison of two systems on the same test users: per-user HR@10 / NDCG@10 differences with a 95%
bootstrap interval (rlrec.metrics.paired_bootstrap). A system is a model folder or `most_popular`.

    python bench/paired.py --data runs/ml100k-id/data --a runs/ml100k-id/sft/model --b most_popular
    python bench/paired.py --data runs/x/data --a runs/x/grpo/model --b runs/x/sft/model --split test

Protocol: leave-one-out split of the run, full catalogue, constrained beam of width 20 for models.
"""

from __future__ import annotations

import argparse

import torch

from rlrec.baselines import most_popular_lists
from rlrec.data.prepared import load_run_data
from rlrec.decoding import ItemTrie, recommend
from rlrec.metrics import hit_at_k, ndcg_at_k, paired_bootstrap, rank_of
from rlrec.models import load_model


def top_lists(system: str, data, rows, k: int) -> list[list[str]]:
    if system == "most_popular":
        return most_popular_lists(data, len(rows), k)
    model, tokenizer = load_model(system)
    trie = ItemTrie.build(tokenizer, data.identifiers)
    recs = recommend(model, tokenizer, rows["prompt"], k=k, trie=trie, beam_width=max(k, 20), batch_size=32)
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
