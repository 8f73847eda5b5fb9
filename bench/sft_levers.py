"""SFT levers against SASRec: each lever alone and together, one table per dataset, one protocol.

    python bench/sft_levers.py [--spec bench/sft_levers.yaml] [--doc docs/sft.md] [--tables NAME ...]

`bench/sft_levers.yaml` names, per dataset, the baseline (SASRec with full softmax, its seeds' metrics.json) and the
SFT rows (label, the seeds' sft/metrics.json, the command). For every row the table gives test NDCG@10 and HR@10
(mean ± sample std over seeds), their ratio to the baseline's mean measured on the same machine, the training
seconds (wall, and CPU seconds of the stage process, comparable when jobs shared the cores), the training time
relative to SASRec's (CPU seconds), and target items learned per CPU-second. The plot beside it draws each row's
validation curve (the guard's NDCG@10 on its validation users, all or a seeded slice, after every epoch) against
CPU seconds into training: rows compared at equal compute. Tables go between `<!-- table:levers_NAME -->` markers of
the doc, plots to `docs/img/sft_levers_NAME.png`. Nothing is typed by hand: a row whose files are missing prints
as missing.
"""

from __future__ import annotations

import json
import statistics
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import doc_tables, expand, fill, mean_std  # noqa: E402  (bench/ is not a package)

REPO = Path(__file__).resolve().parents[1]


def read(path: Path) -> dict:
    """Test metrics, training seconds (wall, CPU), targets per epoch and the validation curve of one run."""
    raw = json.loads(path.read_text())
    manifest = json.loads(path.with_name("manifest.json").read_text())
    if "results" in raw:  # a baseline report
        (result,) = raw["results"].values()
        return {"metrics": result["metrics"], "train_s": result["training"]["train_seconds"], "curve": [],
                "cpu_s": manifest.get("cpu_seconds"), "protocol": raw["protocol"], "targets": None}  # fmt: skip
    training = raw["training"]
    targets = training.get("targets_per_epoch")
    epochs = training.get("epochs_run")
    return {"metrics": raw["test"]["metrics"], "train_s": training["train_seconds"],
            "cpu_s": manifest.get("cpu_seconds"), "protocol": raw["protocol"], "curve": training.get("guard", []),
            "epochs": epochs, "targets": targets * epochs if targets and epochs else None}  # fmt: skip


def spread(values: list, fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    low, high = min(values), max(values)
    return fmt.format(low) if low == high else f"{fmt.format(low)}-{fmt.format(high)}"


def table(name: str, spec: dict) -> tuple[str, dict]:
    base_runs = [read(p) for p in expand(spec["baseline"]["metrics"])]
    base = {m: statistics.fmean(r["metrics"][m] for r in base_runs) for m in ("ndcg@10", "hr@10")}
    base_cpu = statistics.fmean(r["cpu_s"] or r["train_s"] for r in base_runs)
    header = ["model", "seeds", "NDCG@10", "HR@10", "NDCG@10 / SASRec", "train s", "CPU s", "CPU s / SASRec",
              "targets / CPU-s", "epochs"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = [(spec["baseline"]["label"], base_runs)] + [(r["label"], [read(p) for p in expand(r["metrics"])])
                                                        for r in spec["rows"]]  # fmt: skip
    curves, protocol = {}, base_runs[0]["protocol"]
    for label, runs in rows:
        if not runs:
            lines.append(f"| {label} | missing |" + " |" * (len(header) - 2))
            continue
        for run in runs:
            keys = ("split_method", "max_history", "num_items")
            if any(run["protocol"].get(k) != protocol.get(k) for k in keys):
                raise SystemExit(f"table {name}: {label} has another protocol than the baseline")
        ndcg = [r["metrics"]["ndcg@10"] for r in runs]
        cpu = [r["cpu_s"] for r in runs]
        rate = [r["targets"] / r["cpu_s"] for r in runs if r.get("targets") and r["cpu_s"]]
        lines.append(
            f"| {label} | {len(runs)} | {mean_std(ndcg)} | {mean_std([r['metrics']['hr@10'] for r in runs])} | "
            f"{statistics.fmean(ndcg) / base['ndcg@10']:.3f} | {spread([r['train_s'] for r in runs], '{:,.0f}')} | "
            f"{spread(cpu, '{:,.0f}')} | "
            f"{spread([c / base_cpu for c in cpu if c], '{:.2f}')} | {spread(rate, '{:,.0f}')} | "
            f"{spread([r.get('epochs') for r in runs], '{:g}')} |"
        )  # fmt: skip
        if runs[0]["curve"]:
            curves[label] = runs[0]["curve"]
    commands = [r["command"] for r in [spec["baseline"], *spec["rows"]] if r.get("command")]
    lines += ["", f"Protocol: {protocol['split_method']}, history <= {protocol['max_history']}, test split, full "
              f"catalogue ({protocol['num_items']:,} items). Ratios against the mean of the baseline row.", "",
              "```bash", *commands, "```"]  # fmt: skip
    return "\n".join(lines), curves


def plot(title: str, curves: dict, out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for label, curve in curves.items():
        points = [(g.get("cpu_seconds", g.get("seconds")), g["ndcg@10"]) for g in curve]
        ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=label)
    ax.set_xlabel("CPU seconds into training")
    users = {g.get("users") for curve in curves.values() for g in curve}
    who = f"{users.pop():,} validation users" if len(users) == 1 and None not in users else "validation users"
    ax.set_ylabel(f"valid NDCG@10 ({who})")
    ax.legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 110), fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    _, doc_path, doc, tables = doc_tables(__doc__.splitlines()[0], "bench/sft_levers.yaml", "docs/sft.md")
    for name, table_spec in tables:
        text, curves = table(name, table_spec)
        image = doc_path.parent / "img" / f"sft_levers_{name}.png"
        title = f"{table_spec['title']}: validation NDCG@10 per epoch against CPU seconds (seed {table_spec['seed']})"
        if curves and plot(title, curves, image):
            text += f"\n\n![{title}](img/{image.name})"
        doc = fill(doc, f"levers_{name}", text)
        print(text, end="\n\n")
    doc_path.write_text(doc)


if __name__ == "__main__":
    main()
