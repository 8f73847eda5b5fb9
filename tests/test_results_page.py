"""bench/results.py: the results page's tables come from the runs' own metrics files, never mixing protocols."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import results  # noqa: E402

PROTOCOL = {"split_method": "leave_one_out", "max_history": 20, "candidates": "full catalogue", "num_items": 100}


def metrics(ndcg: float) -> dict:
    keys = [*results.COLUMNS, "mrr@10"]
    return {**{k: 0.5 for k in keys}, "ndcg@10": ndcg}


def write_stage(folder, ndcg: float, protocol=PROTOCOL, users: int = 50) -> None:
    folder.mkdir(parents=True)
    body = {"protocol": protocol, "training": {"parameters": 1000, "train_seconds": 12.0},
            "test": {"metrics": metrics(ndcg), "num_users": users}}  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(body))
    (folder / "manifest.json").write_text(json.dumps({"peak_rss_mb": 321.0}))


def write_baseline(folder, ndcg: float) -> None:
    folder.mkdir(parents=True)
    protocol = {**PROTOCOL, "split": "test", "num_users": 50}
    body = {"protocol": protocol, "results": {"sasrec": {"metrics": metrics(ndcg), "training": {"parameters": 7}}}}
    (folder / "metrics.json").write_text(json.dumps(body))


def run_page(tmp_path, spec: dict) -> subprocess.CompletedProcess:
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    doc = tmp_path / "docs" / "results.md"
    if not doc.exists():
        doc.parent.mkdir(parents=True)
        doc.write_text("# Results\nprose\n<!-- table:t -->\nold\n<!-- /table:t -->\nmore prose\n")
    return subprocess.run([sys.executable, str(REPO / "bench/results.py"), "--spec", str(tmp_path / "spec.yaml"),
                           "--doc", str(doc)], capture_output=True, text=True, cwd=tmp_path)  # fmt: skip


def test_table_is_mean_and_std_over_the_seed_files(tmp_path):
    runs = tmp_path / "runs"
    for seed, ndcg in enumerate([0.1, 0.2, 0.3]):
        write_stage(runs / f"cell-s{seed}" / "grpo", ndcg)
    write_baseline(runs / "base" / "sasrec", 0.05)
    spec = {"tables": {"t": {"rows": [
        {"label": "SASRec", "metrics": str(runs / "base/sasrec/metrics.json"), "command": "rlrec baseline sasrec"},
        {"label": "GRPO", "metrics": str(runs / "cell-s*/grpo/metrics.json")},
        {"label": "absent", "metrics": str(runs / "nothing/metrics.json")},
    ]}}}  # fmt: skip
    result = run_page(tmp_path, spec)
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "docs" / "results.md").read_text()
    assert page.startswith("# Results\nprose\n<!-- table:t -->\n") and page.endswith("<!-- /table:t -->\nmore prose\n")
    assert "old" not in page
    grpo = next(line for line in page.splitlines() if line.startswith("| GRPO |"))
    # NDCG@10 of 0.1 / 0.2 / 0.3: mean 0.2, sample std 0.1; 3 seeds; cost columns from metrics and manifest
    assert "| 3 |" in grpo and "0.2000 ± 0.1000" in grpo and grpo.endswith("| 1,000 | 12 | 321 |")
    sasrec = next(line for line in page.splitlines() if line.startswith("| SASRec |"))
    assert "| 1 |" in sasrec and "0.0500" in sasrec and sasrec.endswith("| 7 | - | - |")
    assert "| absent | missing:" in page and "no metrics for 'absent'" in result.stderr
    assert "rlrec baseline sasrec" in page and "test split (50 rows)" in page
    assert (tmp_path / "docs" / "img" / "results_t.png").stat().st_size > 1000
    assert "](img/results_t.png)" in page  # the page shows the plot it wrote, inside the table's markers


def test_a_table_refuses_to_mix_protocols(tmp_path):
    write_stage(tmp_path / "runs" / "a" / "sft", 0.1)
    write_stage(tmp_path / "runs" / "b" / "sft", 0.1, protocol={**PROTOCOL, "split_method": "temporal"})
    rows = [{"label": x, "metrics": str(tmp_path / f"runs/{x}/sft/metrics.json")} for x in ("a", "b")]
    spec = {"tables": {"t": {"rows": rows}}}
    result = run_page(tmp_path, spec)
    assert result.returncode != 0 and "has protocol" in result.stderr and "temporal" in result.stderr


def test_shipped_spec_names_only_recipes_that_exist():
    spec = yaml.safe_load((REPO / "bench/results.yaml").read_text())
    doc = (REPO / "docs/results.md").read_text()
    for name, table in spec["tables"].items():
        assert f"<!-- table:{name} -->" in doc and f"<!-- /table:{name} -->" in doc
        for row in table["rows"]:
            assert row["label"] and row["metrics"]
            for word in row.get("command", "").split():
                if word.startswith("recipes/") or word.startswith("rewards/"):
                    assert (REPO / word).is_file(), f"{row['label']}: {word} does not exist"


def test_shipped_sft_lever_spec_names_only_recipes_that_exist():
    """bench/sft_levers.yaml: every table has its markers in docs/sft.md and every command names real files."""
    spec = yaml.safe_load((REPO / "bench/sft_levers.yaml").read_text())
    doc = (REPO / "docs/sft.md").read_text()
    for name, table in spec["tables"].items():
        assert f"<!-- table:levers_{name} -->" in doc and f"<!-- /table:levers_{name} -->" in doc
        for row in [table["baseline"], *table["rows"]]:
            assert row["label"] and row["metrics"]
            for word in row.get("command", "").split():
                if word.startswith("recipes/") or word.startswith("rewards/"):
                    assert (REPO / word).is_file(), f"{row['label']}: {word} does not exist"


def write_ranks(folder, system: str, users: list[str], ranks: list) -> None:
    test = {"users": users, "targets": ["t"] * len(users), "ranks": {system: ranks}}
    (folder / "ranks.json").write_text(json.dumps({"test": test}))


def test_paired_columns_come_from_the_per_user_ranks(tmp_path):
    """`paired: [label]`: each row's per-user NDCG@10 (and HR@10) difference to that row, from ranks.json; the cold
    slice and the per-CPU-second rates as columns; different test users are refused."""
    runs, users = tmp_path / "runs", [f"u{i}" for i in range(40)]
    write_stage(runs / "x" / "zero_shot", 0.1)
    write_ranks(runs / "x" / "zero_shot", "zero_shot", users, [None] * 40)
    write_stage(runs / "x" / "sft", 0.2)
    write_ranks(runs / "x" / "sft", "sft", users, [3] * 20 + [None] * 20)  # half the users: NDCG@10 0.5, HR@10 1
    rows = [{"label": "zero-shot", "metrics": str(runs / "x/zero_shot/metrics.json")},
            {"label": "SFT", "metrics": str(runs / "x/sft/metrics.json")}]  # fmt: skip
    spec = {"tables": {"t": {"columns": ["ndcg@10", "cold_ndcg@10"], "paired": ["zero-shot"], "rates": True,
                             "paired_metrics": ["ndcg@10", "hr@10"], "plot": False, "rows": rows}}}  # fmt: skip
    for folder in (runs / "x" / "zero_shot", runs / "x" / "sft"):
        body = json.loads((folder / "metrics.json").read_text())
        body["test"]["metrics"]["cold_ndcg@10"] = 0.25
        body["test"]["users_per_cpu_second"] = 0.5
        body["training"].update(train_cpu_seconds=90.0, tokens_per_cpu_second=61.5)
        (folder / "metrics.json").write_text(json.dumps(body))
    result = run_page(tmp_path, spec)
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "docs" / "results.md").read_text()
    assert ("| model | seeds | NDCG@10 | cold NDCG@10 | NDCG@10 vs zero-shot [95% CI] | HR@10 vs zero-shot [95% CI] |"
            in page)  # fmt: skip
    sft = next(line for line in page.splitlines() if line.startswith("| SFT |"))
    low, high = (float(x) for x in sft.split("[")[1].split("]")[0].split(", "))
    assert "| +0.2500 [" in sft and 0.1 < low < 0.25 < high < 0.4  # half the users gain 0.5: mean +0.25
    low, high = (float(x) for x in sft.split("[")[2].split("]")[0].split(", "))
    assert "| +0.5000 [" in sft and 0.3 < low < 0.5 < high < 0.7  # half the users gain a hit: mean +0.5
    assert "| 0.2500 |" in sft and sft.endswith("| 1,000 | 12 | 90 | 61.5 | 0.500 | 321 |")
    zero = next(line for line in page.splitlines() if line.startswith("| zero-shot |"))
    assert "| - |" in zero  # no interval against itself
    write_ranks(runs / "x" / "sft", "sft", [f"v{i}" for i in range(40)], [1] * 40)
    result = run_page(tmp_path, spec)
    assert result.returncode != 0 and "different test users" in result.stderr
