"""`rlrec data prepare` end to end through the real CLI on the real datasets: the numbers in stats.json."""

from __future__ import annotations

import json

import pytest
from datasets import load_from_disk

from rlrec.config import from_dict
from rlrec.data.prepared import load_run_data
from rlrec.recipe import Recipe
from rlrec.stages import data as data_stage
from tests.conftest import REPO, run_cli, tiny_pipeline


def prepare(recipe: str, tmp_path, *overrides: str) -> tuple[dict, object]:
    result = run_cli("data", "prepare", "--config", str(REPO / recipe), f"output_dir={tmp_path}", *overrides)
    assert result.returncode == 0, result.stderr
    name = result.stdout.split("wrote ")[1].split()[0].split("/")[-2]
    out = tmp_path / name / "data"
    return json.loads((out / "stats.json").read_text()), out


def test_movielens_100k_stats(shared_data, tmp_path):
    stats, out = prepare(
        "recipes/movielens-100k/data.yaml", tmp_path, f"--data.source.path={shared_data / 'movielens-100k'}"
    )
    assert (stats["num_users"], stats["num_items"], stats["num_interactions"]) == (943, 1682, 100_000)
    assert stats["splits"] == {"train": 100_000 - 3 * 943, "valid": 943, "test": 943}
    assert stats["skipped"] == {}
    dataset = load_from_disk(str(out / "dataset"))
    row = dataset["test"][0]
    assert row["prompt"][-1]["role"] == "user" and row["completion"][0]["role"] == "assistant"
    assert len(row["history"]) == 20
    catalog = [json.loads(line) for line in (out / "catalog.jsonl").read_text().splitlines()]
    assert len(catalog) == 1682 and len({c["identifier"] for c in catalog}) == 1682
    assert stats["identifier_notes"]["duplicate_title"] == 36  # 18 titles appear twice in ML-100K
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["versions"]["torch"].startswith("2.13.0") and len(next(iter(manifest["inputs"].values()))) == 64
    assert 50 < manifest["peak_rss_mb"] < 24 * 1024  # this process's own peak, in MB


def test_scientific_stats_with_semantic_ids(shared_data, tmp_path):
    sci = shared_data / "amazon18-scientific"
    stats, out = prepare(
        "recipes/amazon18-scientific/data.yaml",
        tmp_path,
        f"--data.source.path={sci}",
        f"--data.source.index_path={sci / 'indexes/rqvae_zcr/Scientific.index.json'}",
    )
    assert (stats["num_users"], stats["num_items"], stats["num_interactions"]) == (8317, 4344, 58_492)
    assert stats["splits"] == {"train": 58_492 - 3 * 8317, "valid": 8317, "test": 8317}
    assert stats["sid_index"] == {"source": str(sci / "indexes/rqvae_zcr/Scientific.index.json"), "used": True}
    test = load_from_disk(str(out / "dataset"))["test"]
    assert test[0]["completion"][0]["content"].startswith("<a_") and test[0]["completion"][0]["content"].count("<") == 4


def test_native_index_collisions_fail_clearly(shared_data, tmp_path):
    sci = shared_data / "amazon18-scientific"
    result = run_cli(
        "data",
        "prepare",
        "--config",
        str(REPO / "recipes/amazon18-scientific/data.yaml"),
        f"output_dir={tmp_path}",
        f"--data.source.path={sci}",
        f"--data.source.index_path={sci / 'indexes/rqvae_native/Scientific.index.json'}",
    )
    assert result.returncode == 2
    assert "sid identifiers collide: 887 items share" in result.stderr


def test_minionerec_given_split(shared_data, tmp_path):
    stats, _ = prepare(
        "recipes/minionerec-industrial/data.yaml",
        tmp_path,
        f"--data.source.path={shared_data / 'minionerec-industrial'}",
    )
    assert stats["splits"] == {"valid": 4532, "test": 4533}
    assert stats["num_items"] == 3686 and stats["num_interactions"] is None


@pytest.mark.slow(reason="three data-prepare runs through the CLI: ~18 s")
def test_minionerec_trains_on_its_valid_rows(shared_data, tmp_path):
    """The export has no train split: its valid rows train, their last 10% select, its test rows stay as given."""
    source = f"--data.source.path={shared_data / 'minionerec-industrial'}"
    stats, out = prepare("recipes/minionerec-industrial/sasrec.yaml", tmp_path, source)
    assert stats["splits"] == {"train": 4079, "valid": 453, "test": 4533}  # 4,532 valid rows = 4,079 + 453
    dataset = load_from_disk(str(out / "dataset"))
    given, _ = prepare("recipes/minionerec-industrial/data.yaml", tmp_path / "given", source)
    original = load_from_disk(str(tmp_path / "given" / "minionerec-industrial" / "data" / "dataset"))
    assert [*dataset["train"]["target"], *dataset["valid"]["target"]] == list(original["valid"]["target"])
    assert list(dataset["test"]["target"]) == list(original["test"]["target"])
    # an export with a train split, or a split method that is not `given`, cannot take the option
    result = run_cli("data", "prepare", "--config", str(REPO / "recipes/movielens-100k/sasrec.yaml"),
                     f"output_dir={tmp_path}", "--data.split.train_from", "valid")  # fmt: skip
    assert result.returncode == 2 and "train_from: valid only applies to split.method: given" in result.stderr


def test_synthetic_quickstart_and_temporal_split(tmp_path):
    stats, _ = prepare("recipes/quickstart/data.yaml", tmp_path, "--data.split.method", "temporal")
    total = stats["num_interactions"] - stats["num_users"]  # one sample per interaction after the first
    assert sum(stats["splits"].values()) == total
    assert stats["splits"]["train"] == round(0.8 * total)


def test_unknown_key_through_cli(tmp_path):
    result = run_cli(
        "data", "prepare", "--config", str(REPO / "recipes/quickstart/data.yaml"), "--data.split.max_histroy", "5"
    )
    assert result.returncode == 2
    assert "did you mean 'max_history'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("recipe", ["recipes/quickstart/data.yaml"])
def test_rerun_replaces_the_stage_folder(recipe, tmp_path):
    prepare(recipe, tmp_path)
    stats, out = prepare(recipe, tmp_path, "--data.source.synthetic.num_users", "200")
    assert stats["num_users"] == 200


def test_multi_task_mixture_counts():
    from datasets import Dataset

    from rlrec.prompts import mix_tasks

    rows = Dataset.from_dict({
        "user": ["u"] * 10, "history": [["1"]] * 10, "target": ["2"] * 10,
        "prompt": [[{"role": "user", "content": "p"}]] * 10,
        "completion": [[{"role": "assistant", "content": "c"}]] * 10,
    })  # fmt: skip
    catalog = [{"item_id": str(i), "title": f"T{i}", "identifier": f"<a_{i}>"} for i in range(4)]
    mixed = mix_tasks(rows, catalog, {"next_item": 1.0, "title_to_sid": 2.0, "sid_to_title": 0.5}, seed=0)
    assert len(mixed) == 10 + 8 + 2
    completions = [r["completion"][0]["content"] for r in mixed]
    assert sum(c.startswith("<a_") for c in completions) == 8 and sum(c.startswith("T") for c in completions) == 2
    asks = [r["prompt"][0]["content"] for r in mixed if r["user"] == ""]
    assert 'Which item is titled "T0"?' in asks


def test_the_prepared_folder_keeps_the_whole_prompt_config(tmp_path):
    """Every field of data.prompt reaches the later stages (RunData.prompt), not a hand-picked few."""
    raw = tiny_pipeline(tmp_path)
    raw["data"]["prompt"].update(format="sequence", system="Recommend.", template="Seen: {history}", separator=" ",
                                 max_title_chars=40)  # fmt: skip
    recipe = from_dict(Recipe, raw)
    data_stage.run(recipe)
    assert load_run_data(recipe.stage_dir("data")).prompt == recipe.data.prompt
