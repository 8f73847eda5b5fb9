"""Baselines: popularity counts and training windows by hand; SASRec learns the synthetic default's structure."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from datasets import Dataset, DatasetDict

from rlrec.baselines import most_popular_lists, windows
from rlrec.data.prepared import RunData, train_popularity, training_sequences
from tests.conftest import REPO, run_cli


def tiny_run_data(train_rows: list[tuple[str, list[str], str]]) -> RunData:
    train = Dataset.from_dict({
        "user": [u for u, _, _ in train_rows], "history": [h for _, h, _ in train_rows],
        "target": [t for _, _, t in train_rows],
    })  # fmt: skip
    popularity = train_popularity(train)
    return RunData(None, DatasetDict({"train": train}), ["a", "b", "c", "d"], {}, popularity, {})


def test_train_popularity_and_sequences_recover_leave_one_out_train_parts():
    # user u: items a b c d e f -> train part a b c d -> samples (a)->b, (a,b)->c, (a,b,c)->d
    rows = [("u", ["a"], "b"), ("u", ["a", "b"], "c"), ("u", ["a", "b", "c"], "d"), ("v", ["d"], "a")]
    data = tiny_run_data(rows)
    assert data.popularity == Counter({"a": 2, "b": 1, "c": 1, "d": 2})
    assert training_sequences(data) == [["a", "b", "c", "d"], ["d", "a"]]
    assert most_popular_lists(data, 2, 3) == [["a", "d", "b"], ["a", "d", "b"]]  # ties by catalogue order
    assert most_popular_lists(data, 1, 2, exclude=[["a"]]) == [["d", "b"]]


def test_most_popular_breaks_ties_by_catalogue_order_at_any_count():
    """Ten items tied at 5,000 interactions (a float32 offset of 1e-6 per item could not separate them) come in
    catalogue order, after the one item counted more."""
    items = [f"i{n}" for n in range(12)]
    data = RunData(
        None, DatasetDict(), items, {}, Counter({**{f"i{n}": 5_000 for n in range(1, 11)}, "i11": 5_001}), {}
    )
    assert most_popular_lists(data, 1, 11) == [["i11", *[f"i{n}" for n in range(1, 11)]]]


def test_windows_cover_every_transition_once():
    inputs, targets = windows([[1, 2, 3, 4, 5, 6, 7], [8, 9]], max_len=3)
    assert inputs.tolist() == [[4, 5, 6], [1, 2, 3], [0, 0, 8]]
    assert targets.tolist() == [[5, 6, 7], [2, 3, 4], [0, 0, 9]]
    pairs = {
        (i, t) for row_i, row_t in zip(inputs, targets, strict=True) for i, t in zip(row_i, row_t, strict=True) if t
    }
    assert pairs == {(k, k + 1) for k in range(1, 7)} | {(8, 9)}
    assert np.all(targets[inputs == 0] == 0)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    result = run_cli("data", "prepare", "--config", str(REPO / "recipes/quickstart/data.yaml"), f"output_dir={out}")
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow(reason="trains SASRec on 1,000 users until early stopping: ~30 s")
def test_sasrec_beats_most_popular_on_the_synthetic_default(quickstart_run):
    common = ["--config", str(REPO / "recipes/quickstart/data.yaml"), f"output_dir={quickstart_run}"]
    popular = run_cli("baseline", "most_popular", *common)
    assert popular.returncode == 0, popular.stderr
    sasrec = run_cli("baseline", "sasrec", *common, "sasrec.max_epochs=30", "sasrec.patience=5")
    assert sasrec.returncode == 0, sasrec.stderr
    run = quickstart_run / "quickstart-title"
    pop = json.loads((run / "most_popular/metrics.json").read_text())["results"]["most-popular"]
    sas = json.loads((run / "sasrec/metrics.json").read_text())["results"]["sasrec"]
    assert sas["metrics"]["ndcg@10"] > 2 * pop["metrics"]["ndcg@10"]
    assert sas["training"]["best_epoch"] <= sas["training"]["epochs_run"] <= 30
    log = (run / "sasrec/train_log.jsonl").read_text().splitlines()
    assert len(log) == sas["training"]["epochs_run"]
    protocol = json.loads((run / "sasrec/metrics.json").read_text())["protocol"]
    assert protocol["split_method"] == "leave_one_out" and protocol["num_users"] == 1000


def test_sasrec_time_budget_stops_after_the_epoch_that_used_it(quickstart_run):
    common = ["--config", str(REPO / "recipes/quickstart/data.yaml"), f"output_dir={quickstart_run}", "name=budget"]
    assert run_cli("data", "prepare", *common).returncode == 0
    result = run_cli("baseline", "sasrec", *common, "sasrec.max_epochs=50", "sasrec.time_budget_s=0.001")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rlrec sasrec: time budget of 0.001 s used after epoch 1; keeping the best epoch (1)" in result.stderr
    sas = json.loads((quickstart_run / "budget" / "sasrec/metrics.json").read_text())["results"]["sasrec"]
    assert sas["training"]["stopped"] == "time_budget" and sas["training"]["epochs_run"] == 1
    assert not (quickstart_run / "budget" / "sasrec" / "checkpoint.pt").exists()
