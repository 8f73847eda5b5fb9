"""Hostile inputs, each through the path a user takes (the CLI where they would use it): a BOM in a CSV header, a
MiniOneRec export that is not UTF-8, an output folder that cannot be made, a missing accelerate config, and the
published folder's API (a string as history, a bad k, a truncated catalogue, a Hub id while offline, zeroed
weights), a 1 MB title. Each ends in a correct result or one line naming the cause, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

import rlrec
from rlrec.config import from_dict
from rlrec.data import read_source
from rlrec.errors import ConfigError, DataError, RlrecError
from rlrec.pipeline import run_pipeline
from rlrec.recipe import Recipe
from rlrec.schema import SourceConfig
from rlrec.stages import data, sft
from rlrec.stages import items as items_stage
from tests.conftest import REPO, minionerec_copy, run_cli, tiny_pipeline


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [text for text in result.stderr.splitlines() if text.startswith("rlrec: error:")]
    return line


def test_a_utf8_bom_before_the_header_is_read_as_utf8(tmp_path):
    path = tmp_path / "events.csv"
    path.write_bytes("\ufeffuser_id,item_id,timestamp\na,1,1\na,2,2\n".encode())
    raw = read_source(from_dict(SourceConfig, {"format": "generic", "path": str(path)}))
    assert raw.interactions.sequences == {"a": ["1", "2"]}


def test_a_minionerec_export_that_is_not_utf8_is_named(shared_data, tmp_path):
    root, csv = minionerec_copy(shared_data, tmp_path)
    csv.write_bytes(csv.read_bytes() + 'A9,"[]",t,"[1]",5,"[]",caf\xe9\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"valid/.*\.csv: not valid UTF-8 \(byte offset \d+\)"):
        read_source(from_dict(SourceConfig, {"format": "minionerec", "path": str(root)}))


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    raw = tiny_pipeline(blocker / "runs")  # output_dir under a file
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    line = one_line_error(run_cli("data", "prepare", "--config", str(recipe_path)))
    assert str(blocker) in line and "Not a directory" in line


def test_a_missing_accelerate_config_is_found_before_any_stage_runs(tmp_path):
    raw = tiny_pipeline(tmp_path)
    raw["pipeline"]["accelerate_config"] = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"nope\.yaml does not exist .*the stages \['sft'\] run under it"):
        run_pipeline(from_dict(Recipe, raw))
    assert not (tmp_path / "pipe" / "data").exists()


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A tiny SFT stage published with `rlrec publish --dry-run`."""
    out = tmp_path_factory.mktemp("hostile_publish")
    raw = tiny_pipeline(out, max_steps=10)
    recipe = from_dict(Recipe, raw)
    data.run(recipe)
    sft.run(recipe)
    folder = out / "published"
    result = run_cli("publish", str(recipe.stage_dir("sft")), "--repo-id", "someone/tiny", "--dry-run",
                     "--out", str(folder))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return folder


def test_recommend_checks_its_arguments(published):
    recommender = rlrec.load(published)
    item = next(iter(recommender.identifiers))
    assert len(recommender.recommend([item], k=3)) == 3
    with pytest.raises(RlrecError, match=r"a history is a list of item ids.* not a string"):
        recommender.recommend(item * 2, k=3)  # "12" is not the history ['1', '2']
    for k in ("5", 0, -1, 2.5, True):
        with pytest.raises(RlrecError, match="k must be a positive integer"):
            recommender.recommend([item], k=k)


def test_a_truncated_catalogue_is_named_with_its_line(published, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(published, copy)
    catalog = copy / "rlrec" / "catalog.jsonl"
    text = catalog.read_text()
    catalog.write_text(text[: len(text) // 2])  # cut in the middle of a line
    lines = catalog.read_text().count("\n") + 1
    with pytest.raises(DataError, match=rf"catalog\.jsonl:{lines}: invalid JSON .* truncated\?"):
        rlrec.load(copy)


def test_a_hub_id_while_offline_is_one_error():
    code = (
        "import rlrec\ntry:\n    rlrec.load('nobody/no-such-recommender')\n"
        "except rlrec.errors.RlrecError as e:\n    print(e)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stdout.startswith("nobody/no-such-recommender: no such local folder, and the Hub download failed")


def test_a_cut_off_as_large_as_the_catalogue_is_refused_before_training(tmp_path):
    raw = tiny_pipeline(tmp_path)
    raw["eval"]["ks"] = [10, 1000]
    recipe = from_dict(Recipe, raw)
    data.run(recipe)
    with pytest.raises(RlrecError, match=r"eval\.ks: K=1000 is not below the catalogue's 40 items, so HR@1000"):
        sft.run(recipe)
    assert not (recipe.stage_dir("sft") / "checkpoints").exists()


def test_settings_that_would_do_nothing_are_refused(tmp_path):
    """A dtype a from-scratch model ignores, an attribute no item has, a catalogue too small for semantic IDs."""
    raw = tiny_pipeline(tmp_path)
    raw["sft"]["model"]["dtype"] = "float16"
    with pytest.raises(ConfigError, match=r"model\.dtype float16: a from-scratch model is built in float32"):
        from_dict(Recipe, raw)
    raw = tiny_pipeline(tmp_path)
    raw["items"] = {"attributes": ["category", "color"]}
    with pytest.raises(ConfigError, match=r"items\.attributes: no item has \['color'\]; .* are \['category'\]"):
        items_stage.run(from_dict(Recipe, raw))
    path = tmp_path / "one.csv"
    path.write_text("user_id,item_id,timestamp\na,1,1\nb,1,2\n")
    raw = tiny_pipeline(tmp_path)
    raw["data"]["source"] = {"format": "generic", "path": str(path)}
    raw["items"] = {}
    with pytest.raises(RlrecError, match=r"the catalogue has 1 item\(s\); semantic IDs need at least 2"):
        items_stage.run(from_dict(Recipe, raw))


def test_a_published_folder_whose_catalogue_the_tokenizer_cannot_spell_is_refused(published, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(published, copy)
    catalog = copy / "rlrec" / "catalog.jsonl"
    lines = catalog.read_text().splitlines()
    first = json.loads(lines[0])
    lines[0] = json.dumps({**first, "identifier": "no-such-token"})
    catalog.write_text("\n".join(lines) + "\n")
    with pytest.raises(RlrecError, match=rf"1 catalogue identifier\(s\) .* e\.g\. item {first['item_id']} "):
        rlrec.load(copy)


def test_a_published_folder_with_zeroed_weights_is_refused(published, tmp_path):
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(published, copy)
    weights = copy / "model.safetensors"
    save_file({name: tensor.zero_() for name, tensor in load_file(weights).items()}, weights, metadata={"format": "pt"})
    with pytest.raises(RlrecError, match=r"copy: the model's input embeddings are all zero; the weights file is"):
        rlrec.load(copy)


def test_a_one_megabyte_title_is_cut_and_reported(tmp_path):
    events, items = tmp_path / "events.csv", tmp_path / "items.csv"
    events.write_text("user_id,item_id,timestamp\n" + "".join(f"u{u},{i},{t}\n" for u in range(4) for t, i in
                                                               enumerate(["a", "b", "c", "d"][u % 2 :])))  # fmt: skip
    items.write_text("item_id,title\na," + "x" * 1_000_000 + "\nb,B\nc,C\nd,D\n")
    raw = tiny_pipeline(tmp_path)
    raw["data"]["source"] = {"format": "generic", "path": str(events), "items_path": str(items)}
    raw["data"]["prompt"]["identifier"] = "title"
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    result = run_cli("data", "prepare", "--config", str(recipe_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'identifiers: {"title_cut_to_max_title_chars": 1}' in result.stdout
    catalog = [json.loads(line) for line in (tmp_path / "pipe" / "data" / "catalog.jsonl").open()]
    assert [len(row["identifier"]) for row in catalog if row["item_id"] == "a"] == [256]
