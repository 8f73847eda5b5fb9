"""Beyond-accuracy trade-off of a reward-weight sweep: test NDCG@10 against long-tail share@10 and coverage@10.

    python bench/tradeoff.py --results runs/ml100k-seq/ablations/tradeoff_ml100k_seq/results.json [...] \
        --out docs/img/tradeoff.png

Each `--results` is the `results.json` that `rlrec ablate` writes for a grid whose reward sets differ in one
weight (recipes/<dataset>/ablations/tradeoff_*.yaml). Every point is a reward set (mean over its seeds, error bars the
sample std), the SFT model it started from is the star; the dataset is one column of panels. The table it prints
(markdown) gives each point's numbers and its change against the SFT start: the curve a product team reads to
pick a weight.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PANELS = (("tail_share@10", "long-tail share@10"), ("coverage@10", "coverage@10"))


def rows(report: dict) -> list[tuple[str, dict, dict]]:
    """(label, mean metrics, std metrics) for the SFT start and every reward set, in the grid's order."""
    out = [("SFT start", report["sft"], {})]
    for name, cell in report["results"].items():
        summary = cell["summary"]
        out.append((name, {m: s["mean"] for m, s in summary.items()}, {m: s["std"] for m, s in summary.items()}))
    return out


def table(title: str, report: dict) -> str:
    base = report["sft"]
    lines = [f"{title}:", "", "| reward set | seeds | NDCG@10 | vs SFT | long-tail share@10 | coverage@10 |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for label, mean, std in rows(report):
        seeds = len(report["results"][label]["runs"]) if label in report["results"] else 1

        def cell(metric: str, mean=mean, std=std) -> str:
            return f"{mean[metric]:.4f}" + (f" ± {std[metric]:.4f}" if metric in std else "")

        change = (mean["ndcg@10"] - base["ndcg@10"]) / base["ndcg@10"]
        lines.append(f"| {label} | {seeds} | {cell('ndcg@10')} | {change:+.1%} | {cell('tail_share@10')} | "
                     f"{cell('coverage@10')} |")  # fmt: skip
    return "\n".join(lines)


def plot(reports: list[tuple[str, dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PANELS), len(reports), figsize=(5.5 * len(reports), 8), squeeze=False,
                             layout="constrained")  # fmt: skip
    for column, (title, report) in enumerate(reports):
        points = rows(report)
        for row, (metric, label) in enumerate(PANELS):
            ax = axes[row][column]
            xs = [mean[metric] for _, mean, _ in points]
            ys = [mean["ndcg@10"] for _, mean, _ in points]
            ax.errorbar(xs[1:], ys[1:], xerr=[std.get(metric, 0) for _, _, std in points[1:]],
                        yerr=[std.get("ndcg@10", 0) for _, _, std in points[1:]], fmt="o-", capsize=3)  # fmt: skip
            ax.plot(xs[:1], ys[:1], "*", markersize=14, color="black", label="SFT start")
            for name, x, y in zip([p[0] for p in points[1:]], xs[1:], ys[1:], strict=True):
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            ax.set_xlabel(label)
            ax.set_ylabel("test NDCG@10")
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", nargs="+", required=True, help="results.json of rlrec ablate grids")
    parser.add_argument("--titles", nargs="*", help="one title per results file (default: the grid's folder)")
    parser.add_argument("--out", default="docs/img/tradeoff.png")
    args = parser.parse_args()
    titles = args.titles or [Path(p).parent.name for p in args.results]
    reports = [(title, json.loads(Path(p).read_text())) for title, p in zip(titles, args.results, strict=True)]
    for title, report in reports:
        print(table(title, report), end="\n\n")
    plot(reports, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
