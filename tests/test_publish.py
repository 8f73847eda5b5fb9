"""`rlrec publish` and `rlrec.load`: a LoRA stage on a from-scratch base is exported (dry run), loaded back, and
reproduces the stage's test metrics; the push goes to a recording Hub server on 127.0.0.1 (`HF_ENDPOINT`), which
must receive every file of the folder and the token from the environment, and the token is written nowhere."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

import rlrec
from rlrec.config import from_dict
from rlrec.data.prepared import load_run_data
from rlrec.evaluate import score_lists
from rlrec.ownership import MARKER
from rlrec.recipe import Recipe
from rlrec.stages import data, sft
from tests.conftest import REPO, tiny_pipeline

TOKEN = "hf_rlrecTestToken0123456789abcdef"


@pytest.fixture(scope="module")
def lora_stage(tmp_path_factory):
    """A LoRA SFT stage on a from-scratch base (so the export must carry base_model/), with test metrics, on a
    small synthetic run."""
    out = tmp_path_factory.mktemp("publish_run")
    raw = tiny_pipeline(out)
    raw["sft"].update(finetune="lora", lora={"r": 4, "alpha": 8})
    raw["sft"]["train"].update(max_steps=30, learning_rate=0.02)
    recipe = from_dict(Recipe, raw)
    data.run(recipe)
    sft.run(recipe)
    return recipe.stage_dir("sft")


def publish_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "rlrec.cli", "publish", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_dry_run_folder_loads_back_and_reproduces_the_metrics(lora_stage, tmp_path):
    folder = tmp_path / "published"
    publish_cli(str(lora_stage), "--repo-id", "someone/tiny-rec", "--dry-run", "--out", str(folder))
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
            "base_model/model.safetensors", "rlrec/recipe.yaml", "rlrec/catalog.jsonl", "rlrec/metrics.json",
            "rlrec/manifest.json"} <= files  # fmt: skip

    card = (folder / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["library_name"] == "peft" and "base_model" not in metadata  # from scratch: no Hub base
    metrics = json.loads((lora_stage / "metrics.json").read_text())["test"]
    reported = {m["type"]: m["value"] for m in metadata["model-index"][0]["results"][0]["metrics"]}
    assert reported["ndcg@10"] == metrics["metrics"]["ndcg@10"] and reported["hr@10"] == metrics["metrics"]["hr@10"]
    assert "leave_one_out, full catalogue of 40 items" in card and 'rlrec.load("someone/tiny-rec")' in card

    recommender = rlrec.load(folder)
    run_data = load_run_data(lora_stage.parent / "data")
    rows = run_data.rows("test", metrics["num_users"])
    lists = recommender.recommend_batch(rows["history"], k=max(recommender.eval.ks))
    assert all(item in recommender.identifiers for ranked in lists for item, _ in ranked)
    scored = score_lists([[item for item, _ in ranked] for ranked in lists], rows["target"], run_data,
                         recommender.eval.ks)  # fmt: skip
    assert scored == metrics["metrics"]
    single = recommender.recommend(rows["history"][0], k=max(recommender.eval.ks))  # same beam, batch of one
    assert [item for item, _ in single] == [item for item, _ in lists[0]]
    with pytest.raises(rlrec.errors.RlrecError, match="not in the catalogue"):
        recommender.recommend(["no-such-item"], k=5)


class RecordingHub(BaseHTTPRequestHandler):
    """Just enough of the Hub API for create_repo + upload_folder; records what arrives."""

    calls: list = []

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def _reply(self, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.calls.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": raw})
        if self.path == "/api/repos/create":
            request = json.loads(raw)
            self._reply({"url": f"http://{self.headers['Host']}/{request['organization']}/{request['name']}"})
        elif self.path == "/api/validate-yaml":
            self._reply({})
        elif "/preupload/" in self.path:
            files = json.loads(raw)["files"]
            self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        elif "/commit/" in self.path:
            repo = self.path.split("/api/models/")[1].split("/commit/")[0]
            self._reply({"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{'1' * 40}", "commitOid": "1" * 40})
        else:
            self.send_error(404)


def test_push_to_a_recording_hub_sends_every_file_and_writes_no_token(lora_stage, tmp_path):
    RecordingHub.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), RecordingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_TOKEN": TOKEN,
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(tmp_path / "hf_home")}  # fmt: skip
        env.pop("HF_HUB_OFFLINE", None)
        folder = tmp_path / "pushed"
        result = publish_cli(str(lora_stage), "--repo-id", "someone/tiny-rec", "--private", "--out", str(folder),
                             env=env)  # fmt: skip
    finally:
        server.shutdown()
    paths = [call["path"] for call in RecordingHub.calls]
    create = next(call for call in RecordingHub.calls if call["path"] == "/api/repos/create")
    assert json.loads(create["body"]) | {"organization": "someone", "name": "tiny-rec", "visibility": "private"} == (
        json.loads(create["body"])
    )
    commit = next(call for call in RecordingHub.calls if "/api/models/someone/tiny-rec/commit/main" in call["path"])
    lines = [json.loads(line) for line in commit["body"].splitlines() if line.strip()]
    files = [line["value"] for line in lines if line["key"] == "file"]
    sent = {file["path"]: base64.b64decode(file["content"]) for file in files}
    on_disk = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert sent == {k: v for k, v in on_disk.items() if k != MARKER}, sorted(set(sent) ^ set(on_disk))
    assert MARKER in on_disk  # rlrec's mark of its own folder stays local
    assert all(call["auth"] == f"Bearer {TOKEN}" for call in RecordingHub.calls), paths

    # The token reached the server from the environment, and nowhere else: not in output, not in any file written.
    assert TOKEN not in result.stdout + result.stderr
    written = [p for p in lora_stage.parent.rglob("*") if p.is_file()] + [p for p in folder.rglob("*") if p.is_file()]
    assert written and not [p for p in written if TOKEN.encode() in p.read_bytes()]


def test_a_new_identifier_kind_runs_end_to_end_through_publish(tmp_path, monkeypatch):
    """docs/architecture.md's way to add an identifier kind (a renderer and its row in IDENTIFIERS, its name in
    schema.IDENTIFIER_KINDS), followed for a toy kind: data, SFT, the published card and rlrec.load all take it."""
    from rlrec import schema
    from rlrec.items import identifiers
    from rlrec.publish import export

    monkeypatch.setattr(schema, "IDENTIFIER_KINDS", (*schema.IDENTIFIER_KINDS, "tagged"))
    monkeypatch.setitem(identifiers.IDENTIFIERS, "tagged", identifiers.IdentifierKind(
        lambda catalog, index, counts, source, max_chars: {item: f"item{item}" for item in catalog.items},
        needs_index=False, tag="tagged-items", description="'item' and its id"))  # fmt: skip
    raw = tiny_pipeline(tmp_path)
    raw["data"]["prompt"]["identifier"] = "tagged"
    raw["sft"]["train"].update(max_steps=10)
    recipe = from_dict(Recipe, raw)
    data.run(recipe)
    sft.run(recipe)
    folder = export(recipe.stage_dir("sft"), tmp_path / "published", "someone/tagged-rec")
    card = (folder / "README.md").read_text()
    assert "tagged-items" in yaml.safe_load(card.split("---\n")[1])["tags"] and "'item' and its id" in card
    recommender = rlrec.load(folder)
    rows = load_run_data(recipe.stage_dir("data")).rows("test", 5)
    lists = recommender.recommend_batch(rows["history"], k=3)
    assert all(recommender.identifiers[item] == f"item{item}" for ranked in lists for item, _ in ranked)
    assert sum(len(ranked) for ranked in lists) == 15


# --- publishing never deletes what is not its own, and never exports a broken stage ---------------------------------


def publish_main(capsys, *args: str) -> tuple[int, str]:
    """`rlrec publish ...` in this process: (exit code, stderr)."""
    from rlrec.cli import main

    code = main(["publish", *args])
    return code, capsys.readouterr().err


def test_publish_refuses_folders_it_did_not_make_and_deletes_nothing(lora_stage, tmp_path, monkeypatch, capsys):
    """Before: `--out .` emptied the current folder, `--out runs/<name>` deleted the run, `--out keep` deleted
    `keep/notes.txt` (the folder was removed before anything was checked)."""
    scratch = tmp_path / "scratch"
    (scratch / "keep").mkdir(parents=True)
    (scratch / "mine.txt").write_text("a user's file")
    (scratch / "keep" / "notes.txt").write_text("notes")
    monkeypatch.chdir(scratch)
    run_files = sorted(p for p in lora_stage.parent.rglob("*") if p.is_file())
    cases = {".": "current folder", str(lora_stage.parent): "overlaps the input", "keep": "not written by rlrec",
             str(lora_stage): "overlaps the input", "mine.txt": "is a file"}  # fmt: skip
    for out, message in cases.items():
        code, err = publish_main(capsys, str(lora_stage), "--repo-id", "a/b", "--dry-run", "--out", out)
        assert code == 2 and message in err and "Traceback" not in err, (out, err)
    assert (scratch / "mine.txt").read_text() == "a user's file"
    assert (scratch / "keep" / "notes.txt").read_text() == "notes"
    assert sorted(p for p in lora_stage.parent.rglob("*") if p.is_file()) == run_files
    # its own folder is replaced whole; no temporary sibling is left
    first = scratch / "published"
    assert publish_main(capsys, str(lora_stage), "--repo-id", "a/b", "--dry-run", "--out", "published")[0] == 0
    (first / "stale.txt").write_text("left by hand")
    assert publish_main(capsys, str(lora_stage), "--repo-id", "a/c", "--dry-run", "--out", "published")[0] == 0
    assert not (first / "stale.txt").exists() and "a/c" not in (first / "README.md").read_text().split("\n")[0]
    assert 'rlrec.load("a/c")' in (first / "README.md").read_text()
    assert sorted(p.name for p in scratch.iterdir()) == ["keep", "mine.txt", "published"]


@pytest.mark.parametrize("missing", ["model/adapter_model.safetensors", "model/tokenizer.json", "metrics.json",
                                     "base_model/model.safetensors", "truncated"])  # fmt: skip
def test_publish_names_every_missing_piece_before_writing(lora_stage, tmp_path, capsys, missing):
    """Before: a stage without weights or tokenizer exported (exit 0) a repo folder a push would upload broken."""
    import shutil

    stage = tmp_path / "run" / "sft"
    shutil.copytree(lora_stage.parent / "data", tmp_path / "run" / "data")
    shutil.copytree(lora_stage, stage)
    if missing == "truncated":
        weights = stage / "model" / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
        expected = "truncated"
    else:
        (stage / missing).unlink()
        expected = str(stage / missing)
    out = tmp_path / "out"
    code, err = publish_main(capsys, str(stage), "--repo-id", "a/b", "--dry-run", "--out", str(out))
    assert code == 2 and "cannot publish" in err and expected in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("damage", ["empty weights", "truncated weights", "tokenizer.json", "config.json",
                                    "tokenizer_config.json", "catalogue id twice"])  # fmt: skip
def test_load_of_a_damaged_folder_is_one_error_naming_the_file(lora_stage, tmp_path, capsys, damage):
    """Before: a library traceback naming no file, or (one id twice) an item dropped without a word."""
    folder = tmp_path / "published"
    assert publish_main(capsys, str(lora_stage), "--repo-id", "a/b", "--dry-run", "--out", str(folder))[0] == 0
    named = {"empty weights": folder / "adapter_model.safetensors",
             "truncated weights": folder / "adapter_model.safetensors",
             "config.json": folder / "base_model" / "config.json",
             "catalogue id twice": folder / "rlrec" / "catalog.jsonl"}.get(damage, folder / damage)  # fmt: skip
    if damage == "empty weights":
        named.write_bytes(b"")
    elif damage == "truncated weights":
        named.write_bytes(named.read_bytes()[: named.stat().st_size // 2])
    elif damage == "catalogue id twice":
        lines = named.read_text().splitlines()
        named.write_text("\n".join([*lines, lines[0]]) + "\n")
    else:
        named.unlink()
    with pytest.raises(rlrec.errors.RlrecError) as caught:
        rlrec.load(folder)
    assert str(named) in str(caught.value) or named.name in str(caught.value), caught.value


def test_recommend_caps_k_at_the_catalogue_and_reads_any_iterable_once(lora_stage, tmp_path, capsys):
    """Before: k=10**9 allocated until the kernel killed the process; a generator history was consumed by the id
    check and answered as an empty history."""
    folder = tmp_path / "published"
    assert publish_main(capsys, str(lora_stage), "--repo-id", "a/b", "--dry-run", "--out", str(folder))[0] == 0
    recommender = rlrec.load(folder)
    history = list(recommender.identifiers)[:3]
    everything = recommender.recommend(history, k=10**9)
    catalogue = len(recommender.identifiers)
    excluded = 3 if recommender.eval.exclude_history else 0
    assert len(everything) == catalogue - excluded and len({item for item, _ in everything}) == len(everything)
    assert recommender.recommend(iter(history), k=5) == recommender.recommend(history, k=5)
    assert recommender.recommend_batch(iter([iter(history)]), k=5) == [recommender.recommend(history, k=5)]
