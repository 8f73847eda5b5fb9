"""Build the tables and plots of docs/results.md from the runs' own metrics files.

    python bench/results.py [--spec bench/results.yaml] [--doc docs/results.md] [--tables NAME ...]

`bench/results.yaml` names, for each table, its rows: a label, the `metrics.json` files of the row's seeds (paths or
globs under the repo) and the command that produced them. This script reads every file, refuses to put runs of
different protocols (split, history cap, catalogue, test users) in one table, and writes each table as mean ± sample
standard deviation over the files found, with the model size, training seconds and peak memory of the runs, between
the markers `<!-- table:NAME -->` and `<!-- /table:NAME -->` of the doc (the prose around them is written by hand)
and as `docs/img/results_NAME.png` (NDCG@10 per row with error bars). The scaling tables come from
`docs/scaling.json` (bench/scaling.py) into the markers `table:scaling_cost` and
`table:scaling_size` when the doc has them. Nothing is typed in by hand: a row whose files
are missing is printed as missing, not filled in.

The metrics are the evaluation harness's (docs/evaluation.md): HR@K, NDCG@K, MRR@10 over the full catalogue,
coverage@10 (share of the catalogue recommended to anyone), long-tail share@10 (share of recommended items outside
the most popular 20% of items) and the valid rate (share of generated items that are catalogue items).

A table may name its own `columns` (any metric key, e.g. `cold_ndcg@10`, the cold-item slice), `rates: true` for the
cost per CPU-second (training tokens, evaluated users), and `paired: [label, ...]`: for each named row, a column of
every row's per-user NDCG@10 difference to it with a 95% paired bootstrap interval, computed from the `ranks.json`
beside each metrics file (the same users in both, or the table is refused; several seeds are averaged per user);
`paired_metrics: [ndcg@10, hr@10]` adds a column per metric (NDCG@K or HR@K, default NDCG@10 alone).
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import statistics
import sys
import textwrap
from pathlib import Path

import yaml

from rlrec.metrics import hit_at_k, ndcg_at_k, paired_bootstrap

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("hr@1", "hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20", "mrr@10", "coverage@10",
           "tail_share@10", "valid_rate")  # fmt: skip
HEADERS = {"tail_share@10": "long-tail@10", "valid_rate": "valid"}
PROTOCOL_KEYS = ("split_method", "max_history", "candidates", "num_items")


def read_run(path: Path) -> dict:
    """Test metrics, protocol and cost of one run, from a stage's or a baseline's metrics.json (+ manifest.json)."""
    raw = json.loads(path.read_text())
    protocol = {k: raw["protocol"].get(k) for k in PROTOCOL_KEYS}
    if "results" in raw:  # `rlrec baseline`: {results: {system: {metrics, training}}}, test split in the protocol
        if raw["protocol"].get("split") != "test":
            raise SystemExit(f"{path}: evaluated on {raw['protocol'].get('split')!r}, the tables use the test split")
        ((system, result),) = raw["results"].items()
        metrics, training, users = result["metrics"], result.get("training", {}), raw["protocol"]["num_users"]
        parameters, users_per_cpu_second = training.get("parameters"), None
    else:  # rlrec sft / grpo / dpo / zero_shot: {training, test: {metrics, num_users}}
        system = path.parent.name
        metrics, training, users = raw["test"]["metrics"], raw["training"], raw["test"]["num_users"]
        parameters = training.get("parameters") or training.get("trainable_parameters")
        users_per_cpu_second = raw["test"].get("users_per_cpu_second")
    seconds = training.get("train_seconds")
    if training.get("rounds"):  # DPO: a rerun that skipped finished rounds reports only its own seconds
        seconds = round(sum(r["seconds"] for r in training["rounds"]), 1)
    manifest = path.with_name("manifest.json")
    manifest = json.loads(manifest.read_text()) if manifest.is_file() else {}
    sample = {k: raw["protocol"].get(k) for k in ("users_sample", "users_seed") if raw["protocol"].get(k) is not None}
    return {"metrics": metrics, "protocol": {**protocol, **sample, "test_users": users}, "parameters": parameters,
            "train_seconds": seconds, "peak_rss_mb": manifest.get("peak_rss_mb"), "path": str(path),
            "system": system, "train_cpu_seconds": training.get("train_cpu_seconds"),
            "tokens_per_cpu_second": training.get("tokens_per_cpu_second"),
            "users_per_cpu_second": users_per_cpu_second}  # fmt: skip


def per_user(runs: list[dict], metric: str = "ndcg@10") -> tuple[list[str], list[float]]:
    """(users, the metric (NDCG@K or HR@K) per user averaged over the runs' seeds) from the ranks.json beside each
    run's metrics."""
    name, k = metric.split("@")
    score = {"ndcg": ndcg_at_k, "hr": hit_at_k}[name]
    users, totals = None, None
    for run in runs:
        ranks_path = Path(run["path"]).with_name("ranks.json")
        if not ranks_path.is_file():
            raise SystemExit(f"{ranks_path}: no per-user ranks for the paired interval; evaluate the run again")
        test = json.loads(ranks_path.read_text())["test"]
        if users is not None and test["users"] != users:
            raise SystemExit(f"{ranks_path}: other test users than the row's other seeds")
        users = test["users"]
        values = [score(rank, int(k)) for rank in test["ranks"][run["system"]]]
        totals = values if totals is None else [a + b for a, b in zip(totals, values, strict=True)]
    return users, [value / len(runs) for value in totals]


def paired_cell(row: tuple[list[str], list[float]], reference: tuple[list[str], list[float]]) -> str:
    if row[0] != reference[0]:
        raise SystemExit("paired interval over different test users: the rows' eval.users samples differ")
    mean, low, high = paired_bootstrap(row[1], reference[1])
    return f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]"


def expand(patterns: str | list[str]) -> list[Path]:
    patterns = [patterns] if isinstance(patterns, str) else patterns
    found = sorted({Path(p) for pattern in patterns for p in glob.glob(str(REPO / pattern))})
    return found


def mean_std(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def cost(values: list, fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    low, high = min(values), max(values)
    return fmt.format(low) if low == high else f"{fmt.format(low)}-{fmt.format(high)}"


def column_header(column: str) -> str:
    if column.startswith("cold_"):
        return "cold " + column_header(column.removeprefix("cold_"))
    return HEADERS.get(column, column.upper().replace("COVERAGE", "coverage"))


def build_table(name: str, spec: dict) -> tuple[str, list[dict]]:
    columns, rates, paired = spec.get("columns", COLUMNS), spec.get("rates", False), spec.get("paired", [])
    pairs = [(label, metric) for label in paired for metric in spec.get("paired_metrics", ["ndcg@10"])]
    rate_columns = ["train CPU s", "train tokens / CPU s", "eval users / CPU s"] if rates else []
    paired_headers = [f"{column_header(metric)} vs {label} [95% CI]" for label, metric in pairs]
    header = ["model", "seeds", *map(column_header, columns), *paired_headers, "parameters", "train s", *rate_columns,
              "peak RSS MB"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    protocol, summary = None, []
    found = {row["label"]: [read_run(p) for p in expand(row["metrics"])] for row in spec["rows"]}
    references = {(label, metric): per_user(found[label], metric) for label, metric in pairs if found.get(label)}
    for row in spec["rows"]:
        runs = found[row["label"]]
        if not runs:
            lines.append(f"| {row['label']} | missing: {row['metrics']} |" + " |" * (len(header) - 2))
            print(f"{name}: no metrics for {row['label']!r} ({row['metrics']})", file=sys.stderr)
            continue
        for run in runs:
            if protocol is None:
                protocol = run["protocol"]
            elif run["protocol"] != protocol:
                raise SystemExit(f"table {name}: {run['path']} has protocol {run['protocol']}, the table {protocol}")
        cells = [mean_std([r["metrics"][c] for r in runs]) for c in columns]
        for label, metric in pairs:
            cells.append("-" if label == row["label"] or (label, metric) not in references
                         else paired_cell(per_user(runs, metric), references[label, metric]))  # fmt: skip
        costs = [cost([r["parameters"] for r in runs], "{:,}"), cost([r["train_seconds"] for r in runs], "{:,.0f}")]
        if rates:
            costs += [cost([r["train_cpu_seconds"] for r in runs], "{:,.0f}"),
                      cost([r["tokens_per_cpu_second"] for r in runs], "{:,.1f}"),
                      cost([r["users_per_cpu_second"] for r in runs], "{:.3f}")]  # fmt: skip
        costs.append(cost([r["peak_rss_mb"] for r in runs], "{:,.0f}"))
        lines.append(f"| {row['label']} | {len(runs)} | " + " | ".join(cells + costs) + " |")
        ndcg = [r["metrics"]["ndcg@10"] for r in runs]
        summary.append({"label": row["label"], "seeds": len(runs), "ndcg@10": statistics.fmean(ndcg),
                        "std": statistics.stdev(ndcg) if len(ndcg) > 1 else 0.0})  # fmt: skip
    if protocol:
        lines.append("")
        sample = (f", a seeded sample (seed {protocol['users_seed']}) of the test users"
                  if protocol.get("users_sample") else "")  # fmt: skip
        lines.append(f"Protocol: {protocol['split_method']}, history <= {protocol['max_history']}, test split "
                     f"({protocol['test_users']:,} rows{sample}), {protocol['candidates']} "
                     f"({protocol['num_items']:,} items).")  # fmt: skip
    commands = [row["command"] for row in spec["rows"] if row.get("command")]
    if commands:
        lines += ["", "```bash", *commands, "```"]
    return "\n".join(lines), summary


def plot(title: str, summary: list[dict], out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(summary) + 1.5), layout="constrained")
    labels = [s["label"] for s in summary][::-1]
    ax.barh(labels, [s["ndcg@10"] for s in summary][::-1], xerr=[s["std"] for s in summary][::-1], color="#4c72b0")
    ax.set_xlabel("test NDCG@10 (mean ± std over seeds)")
    fig.suptitle(textwrap.fill(title, 90), fontsize=10)  # over the whole figure: long row labels push the axes right
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def fill(doc: str, name: str, text: str) -> str:
    pattern = re.compile(rf"(<!-- table:{re.escape(name)} -->\n)(?:.*?\n)?(<!-- /table:{re.escape(name)} -->)", re.S)
    if not pattern.search(doc):
        raise SystemExit(f"the doc has no markers <!-- table:{name} --> ... <!-- /table:{name} -->")
    return pattern.sub(lambda m: m.group(1) + text + "\n" + m.group(2), doc)


def doc_tables(description: str, spec: str, doc: str) -> tuple[argparse.Namespace, Path, str, list]:
    """The command line every doc-table builder shares (--spec, --doc, --tables): (arguments, the doc's path, its
    text, the (name, table spec) pairs to rebuild)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--spec", default=str(REPO / spec))
    parser.add_argument("--doc", default=str(REPO / doc))
    parser.add_argument("--tables", nargs="*", help="rebuild only these tables (default: all)")
    args = parser.parse_args()
    tables = yaml.safe_load(Path(args.spec).read_text())["tables"].items()
    return args, Path(args.doc), Path(args.doc).read_text(), [(n, t) for n, t in tables if not args.tables or
                                                               n in args.tables]  # fmt: skip


def main() -> None:
    args, doc_path, doc, tables = doc_tables(__doc__.splitlines()[0], "bench/results.yaml", "docs/results.md")
    for name, table_spec in tables:
        text, summary = build_table(name, table_spec)
        image = doc_path.parent / "img" / f"results_{name}.png"
        title = table_spec.get("title", name)
        if table_spec.get("plot", True) and summary and plot(title, summary, image):
            text += f"\n\n![{title}: test NDCG@10 per row, mean ± std over seeds](img/{image.name})"
        doc = fill(doc, name, text)
        print(f"{name}: {len(summary)} rows")
    scaling_record = REPO / "docs/scaling.json"  # written by bench/scaling.py
    if scaling_record.is_file() and not args.tables:
        sys.path.insert(0, str(REPO / "bench"))
        from scaling import markdown

        for kind, record in json.loads(scaling_record.read_text()).items():
            if f"<!-- table:scaling_{kind} -->" not in doc:
                continue
            text = markdown(kind, record["rows"]) + f"\n\n```bash\n{record['command']}\n```"
            doc = fill(doc, f"scaling_{kind}", text)  # markers <!-- table:scaling_cost --> etc.
            print(f"scaling_{kind}: {len(record['rows'])} rows")
    doc_path.write_text(doc)


if __name__ == "__main__":
    main()
