"""The evaluation harness: every model and baseline is scored here, on the same rows, by the same metrics.

Protocol (docs/evaluation.md): the run's data split (leave-one-out by default), one row per user, the full
catalogue as candidates (no sampled negatives), history items kept as candidates unless `exclude_history` (then for
every system in the table). A generative model's list is its constrained top-K beam (`evaluate_generative`, beam
width >= K); a scoring model (SASRec, most-popular) ranks all items by score (`rlrec.baselines`). `metrics.json`
records the protocol next to the numbers, and a table never mixes protocols.

Every system of a run is scored on the same rows (`eval_rows`: all users of the split, or the seeded sample
`eval.users`), and every evaluation also writes each user's target rank (`ranks.json` beside `metrics.json`), so
any two systems of a run can be compared per user with a paired interval without decoding again. The metrics
include the cold-item slice: users whose test target has at most `COLD_MAX_COUNT` training interactions, where
knowledge from outside the logs (a pretrained language model's, item text) has the most to add.
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
from rlrec.metrics import COLD_MAX_COUNT, accuracy_metrics, beyond_accuracy, head_items, rank_of
from rlrec.schema import EvalConfig

TABLE_COLUMNS = ("hr@1", "hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr@10", "coverage@10",
                 "tail_share@10", "valid_rate")  # fmt: skip


def check_ks(ks: Sequence[int], data: RunData) -> None:
    """A cut-off as large as the catalogue makes HR@K 1.0 whatever the model: an error, checked by the training
    stages before they train and again when lists are scored."""
    if max(ks) >= len(data.item_ids):
        raise RlrecError(f"eval.ks: K={max(ks)} is not below the catalogue's {len(data.item_ids)} items, so "
                         f"HR@{max(ks)} would be 1.0 whatever the model; use a smaller K")  # fmt: skip


def eval_rows(data: RunData, split: str, config: EvalConfig, max_users: int | None = None):
    """The rows every system of a run is scored on: the split's users, or the seeded sample `eval.users` of them
    (the same users for every system), then the first `max_users` of those (quick checks)."""
    rows = data.sample(split, config.users, config.seed)
    return rows.select(range(min(max_users, len(rows)))) if max_users else rows


def sample_protocol(config: EvalConfig) -> dict:
    """The protocol fields that say which users were scored: tables refuse to mix different samples."""
    return {"users_sample": config.users, "users_seed": config.seed if config.users is not None else None}


def score_lists(lists: Sequence[Sequence[str]], targets: Sequence[str], data: RunData, ks: Sequence[int]) -> dict:
    head = head_items(data.popularity, data.item_ids)
    check_ks(ks, data)
    metrics = accuracy_metrics(lists, targets, ks)
    metrics.update(beyond_accuracy(lists, data.item_ids, data.popularity, ks, head))
    cold = [i for i, target in enumerate(targets) if data.popularity.get(target, 0) <= COLD_MAX_COUNT]
    metrics["cold_users"] = len(cold)
    if cold:
        sliced = accuracy_metrics([lists[i] for i in cold], [targets[i] for i in cold], ks)
        metrics.update({f"cold_{key}": value for key, value in sliced.items() if not key.startswith("mrr")})
    return {key: round(value, 6) for key, value in metrics.items()}


def target_ranks(lists: Sequence[Sequence[str]], targets: Sequence[str]) -> list[int | None]:
    """Each user's 1-based target rank in their list (None: not in it), for paired comparisons."""
    return [rank_of(target, ranked) for target, ranked in zip(targets, lists, strict=True)]


def write_ranks(out: Path, by_split: Mapping[str, tuple]) -> None:
    """`ranks.json`: {split: {users, targets, ranks: {system: [rank or null per user]}}}; `by_split` maps a split to
    (rows, {system: ranks})."""
    payload = {split: {"users": list(rows["user"]), "targets": list(rows["target"]), "ranks": ranks}
               for split, (rows, ranks) in by_split.items()}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "ranks.json").write_text(json.dumps(payload) + "\n", encoding="utf-8")


def read_ranks(stage_dir: str | Path, split: str = "test") -> tuple[list[str], dict[str, list[int | None]]]:
    """(users, {system: ranks}) of one split of a stage's `ranks.json`."""
    path = Path(stage_dir) / "ranks.json"
    if not path.is_file():
        raise RlrecError(f"{path}: no per-user ranks; evaluate the stage again (its evaluation writes them)")
    payload = json.loads(path.read_text(encoding="utf-8"))
    if split not in payload:
        raise RlrecError(f"{path}: no '{split}' split (has {', '.join(payload)})")
    return payload[split]["users"], payload[split]["ranks"]


def evaluate_generative(model, tokenizer, data: RunData, config: EvalConfig, rows, inputs: ModelInputs | None = None,
                        progress: bool = True) -> dict:  # fmt: skip
    """Constrained top-K beam of a generative model on `rows`, scored by the harness. Pass the run's `inputs` (prompt
    encoding and catalogue trie) when evaluating repeatedly (the guard); without them they are built here."""
    started, cpu_started = time.time(), time.process_time()
    inputs = inputs if inputs is not None else ModelInputs.build(tokenizer, data.identifiers, data.prompt)
    recs = recommend(
        model, tokenizer, inputs.prompt_ids(tokenizer, rows), k=max(config.ks), trie=inputs.trie,
        beam_width=config.beam_width,
        batch_size=config.batch_size, exclude=rows["history"] if config.exclude_history else None,
        progress=progress,
    )  # fmt: skip
    lists = [[item for item, _ in rec] for rec in recs]
    cpu_seconds = time.process_time() - cpu_started
    return {
        "metrics": score_lists(lists, rows["target"], data, config.ks),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.time() - started, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "users_per_cpu_second": round(len(lists) / max(cpu_seconds, 1e-9), 3),
        "ranks": target_ranks(lists, rows["target"]),
    }


def markdown_table(results: Mapping[str, Mapping[str, float]], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    columns = [c for c in columns if any(c in r for r in results.values())]
    lines = ["| system | " + " | ".join(c.upper().replace("_", " ") for c in columns) + " |",
             "|---|" + "---|" * len(columns)]  # fmt: skip
    for name, metrics in results.items():
        cells = [f"{metrics[c]:.4f}" if c in metrics else "-" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, results: Mapping[str, dict], data: RunData, config: EvalConfig, rows) -> None:
    """`metrics.json` and `metrics.md` of a report (a baseline, `rlrec eval`) scored on `rows`, and the systems'
    per-user ranks (`ranks.json`, popped from each result)."""
    out.mkdir(parents=True, exist_ok=True)
    write_ranks(out, {config.split: (rows, {name: result.pop("ranks") for name, result in results.items()})})
    protocol = {**data.protocol, "split": config.split, "exclude_history": config.exclude_history,
                "num_users": len(rows), "max_users": config.max_users, **sample_protocol(config)}  # fmt: skip
    payload = {"protocol": protocol, "results": results}
    (out / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    header = (f"Protocol: {protocol['split_method']} ({config.split} split, {protocol['num_users']} users), "
              f"full catalogue of {protocol['num_items']} items, history <= {protocol['max_history']}, "
              f"exclude_history={config.exclude_history}.\n\n")  # fmt: skip
    (out / "metrics.md").write_text(header + markdown_table({k: v["metrics"] for k, v in results.items()}))
