"""The evaluation harness: every model and baseline is scored here, on the same rows, by the same metrics.

Protocol (docs/evaluation.md): the run's data split (leave-one-out by default), one row per user, the full
catalogue as candidates (no sampled negatives), history items kept as candidates unless `exclude_history` (then for
every system in the table). A generative model's list is its constrained top-K beam (`evaluate_generative`, beam
width >= K); a scoring model (SASRec, most-popular) ranks all items by score (`rlrec.baselines`). `metrics.json`
records the protocol next to the numbers, and a table never mixes protocols.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from rlrec.data.prepared import RunData
from rlrec.decoding import recommend
from rlrec.decoding.inputs import ModelInputs
from rlrec.errors import RlrecError
from rlrec.metrics import accuracy_metrics, beyond_accuracy, head_items
from rlrec.schema import EvalConfig

TABLE_COLUMNS = ("hr@1", "hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr@10", "coverage@10",
                 "tail_share@10", "valid_rate")  # fmt: skip


def check_ks(ks: Sequence[int], data: RunData) -> None:
    """A cut-off as large as the catalogue makes HR@K 1.0 whatever the model: an error, checked by the training
    stages before they train and again when lists are scored."""
    if max(ks) >= len(data.item_ids):
        raise RlrecError(f"eval.ks: K={max(ks)} is not below the catalogue's {len(data.item_ids)} items, so "
                         f"HR@{max(ks)} would be 1.0 whatever the model; use a smaller K")  # fmt: skip


def score_lists(lists: Sequence[Sequence[str]], targets: Sequence[str], data: RunData, ks: Sequence[int]) -> dict:
    head = head_items(data.popularity, data.item_ids)
    check_ks(ks, data)
    metrics = accuracy_metrics(lists, targets, ks)
    metrics.update(beyond_accuracy(lists, data.item_ids, data.popularity, ks, head))
    return {key: round(value, 6) for key, value in metrics.items()}


def evaluate_generative(model, tokenizer, data: RunData, config: EvalConfig, rows, inputs: ModelInputs | None = None,
                        progress: bool = True) -> dict:  # fmt: skip
    """Constrained top-K beam of a generative model on `rows`, scored by the harness. Pass the run's `inputs` (prompt
    encoding and catalogue trie) when evaluating repeatedly (the guard); without them they are built here."""
    started = time.time()
    inputs = inputs if inputs is not None else ModelInputs.build(tokenizer, data.identifiers, data.prompt)
    recs = recommend(
        model, tokenizer, inputs.prompt_ids(tokenizer, rows), k=max(config.ks), trie=inputs.trie,
        beam_width=config.beam_width,
        batch_size=config.batch_size, exclude=rows["history"] if config.exclude_history else None,
        progress=progress,
    )  # fmt: skip
    lists = [[item for item, _ in rec] for rec in recs]
    return {
        "metrics": score_lists(lists, rows["target"], data, config.ks),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.time() - started, 1),
    }


def markdown_table(results: Mapping[str, Mapping[str, float]], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    columns = [c for c in columns if any(c in r for r in results.values())]
    lines = ["| system | " + " | ".join(c.upper().replace("_", " ") for c in columns) + " |",
             "|---|" + "---|" * len(columns)]  # fmt: skip
    for name, metrics in results.items():
        cells = [f"{metrics[c]:.4f}" if c in metrics else "-" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, results: Mapping[str, Mapping], data: RunData, config: EvalConfig, extra: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    protocol = {**data.protocol, "split": config.split, "exclude_history": config.exclude_history,
                "num_users": extra.pop("num_users"), "max_users": config.max_users}  # fmt: skip
    payload = {"protocol": protocol, "results": results, **extra}
    (out / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    header = (f"Protocol: {protocol['split_method']} ({config.split} split, {protocol['num_users']} users), "
              f"full catalogue of {protocol['num_items']} items, history <= {protocol['max_history']}, "
              f"exclude_history={config.exclude_history}.\n\n")  # fmt: skip
    (out / "metrics.md").write_text(header + markdown_table({k: v["metrics"] for k, v in results.items()}))
