"""`rlrec publish`: a trained stage as a Hugging Face Hub repository, with a model card.

    rlrec publish runs/<name>/<stage> --repo-id user/name [--private] [--dry-run] [--out DIR]

The repo folder holds what `rlrec.load` needs to recommend, and what a reader needs to trust the numbers:
- the adapter (or full model) and the tokenizer with the identifier tokens, at the root (`peft` / `transformers`
  load it directly); `base_model/` when the adapter's base was built from scratch (nobody else has its weights);
- `rlrec/recipe.yaml` (the resolved recipe), `rlrec/catalog.jsonl` (item id, title, identifier), `rlrec/index.json`
  (the semantic-ID index, when the run built one), `rlrec/metrics.json` and `rlrec/manifest.json` of the stage;
- `README.md`, the model card: YAML metadata (`base_model`, `library_name`, tags, metrics in model-index form) and
  a readable card (what it recommends, training stages and rewards, test metrics with their protocol, usage).

`--dry-run` only writes the folder (default `runs/<name>/publish/<stage>/`; `--out` must be new, empty, or a folder
`rlrec publish` wrote, never one holding the stage or the current folder). Otherwise it is pushed with
`huggingface_hub` (`create_repo`, `upload_folder`); the token comes from `HF_TOKEN` or the `hf auth login` cache and
is never written or printed by rlrec.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from rlrec.config import load_config
from rlrec.errors import RlrecError
from rlrec.items.identifiers import IDENTIFIERS
from rlrec.manifest import hash_path
from rlrec.models import BASE_MODEL_DIR, model_folder_problems
from rlrec.ownership import MARKER, claim_output, replace_output, staging_folder
from rlrec.recipe import Recipe
from rlrec.recommender import META_DIR

CARD_METRICS = (("hr@10", "HR@10"), ("ndcg@10", "NDCG@10"), ("mrr@10", "MRR@10"), ("hr@1", "HR@1"),
                ("valid_rate", "valid rate"), ("coverage@10", "coverage@10"))  # fmt: skip


PURPOSE = "rlrec publish"


def stage_problems(stage_dir: Path) -> list[str]:
    """Everything a stage folder lacks to be published and loaded again, each piece named; empty when complete.
    Checked before anything is written or pushed: a repo without weights would upload a broken model."""
    model_dir, data_dir = stage_dir / "model", stage_dir.parent / "data"
    required = {
        stage_dir / "metrics.json": "its metrics",
        stage_dir / "config.yaml": "its resolved recipe",
        data_dir / "catalog.jsonl": "the catalogue",
    }
    problems = [f"{path} ({what}) is missing" for path, what in required.items() if not path.is_file()]
    if not model_dir.is_dir():
        return [f"{model_dir} (a trained model) is missing; is this a finished stage?", *problems]
    problems += model_folder_problems(model_dir)
    base = stage_dir / BASE_MODEL_DIR
    if base.is_dir():  # a from-scratch base the adapter needs
        problems += model_folder_problems(base, tokenizer=False)
    if (stage_dir / "config.yaml").is_file():
        recipe = load_config(Recipe, stage_dir / "config.yaml")
        kind = recipe.section("data").prompt.identifier
        if IDENTIFIERS[kind].needs_index and not (data_dir / "index.json").is_file():
            problems.append(f"{data_dir / 'index.json'} (the semantic-ID index its {kind} identifiers read) is missing")
        adapter = (model_dir / "adapter_config.json").is_file()
        if adapter and recipe.sft is not None and recipe.sft.model.from_scratch and not base.is_dir():
            problems.append(f"{base} (the from-scratch base model its adapter is trained on) is missing")
    return problems


def export(stage_dir: str | Path, out: str | Path, repo_id: str) -> Path:
    """Write the repo folder for `stage_dir` into `out`: a new or empty folder, or one `rlrec publish` wrote before
    (replaced). Written into a temporary sibling and renamed when complete (`rlrec.ownership`)."""
    stage_dir = Path(stage_dir)
    model_dir, data_dir = stage_dir / "model", stage_dir.parent / "data"
    problems = stage_problems(stage_dir)
    if problems:
        raise RlrecError(f"{stage_dir}: cannot publish: " + "; ".join(problems))
    target = claim_output(out, PURPOSE, inputs=[stage_dir, data_dir])
    staging = staging_folder(target)
    try:
        shutil.copytree(model_dir, staging, ignore=shutil.ignore_patterns("training_args.bin", "checkpoint-*"),
                        dirs_exist_ok=True)  # fmt: skip
        base = stage_dir / BASE_MODEL_DIR
        if (model_dir / "adapter_config.json").is_file() and base.is_dir():
            shutil.copytree(base, staging / BASE_MODEL_DIR)
        meta = staging / META_DIR
        meta.mkdir()
        shutil.copy(stage_dir / "config.yaml", meta / "recipe.yaml")
        shutil.copy(stage_dir / "metrics.json", meta / "metrics.json")
        shutil.copy(data_dir / "catalog.jsonl", meta / "catalog.jsonl")
        for source, name in ((stage_dir / "manifest.json", "manifest.json"), (data_dir / "index.json", "index.json")):
            if source.is_file():
                shutil.copy(source, meta / name)
        (staging / "README.md").write_text(model_card(stage_dir, staging, repo_id), encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return replace_output(staging, target, PURPOSE)


def _base_model(out: Path) -> tuple[str | None, str | None]:
    """(the Hub id of the pretrained base, for the card's `base_model`; how the card names the base): (None, None)
    for a from-scratch base (in `base_model/`); a local folder or GGUF file is named, not copied, in the card."""
    adapter = out / "adapter_config.json"
    if not adapter.is_file() or (out / BASE_MODEL_DIR).is_dir():
        return None, None
    name = json.loads(adapter.read_text())["base_model_name_or_path"]
    if name.count("/") == 1 and not Path(name).exists():
        return name, name
    if name.endswith(".gguf") and Path(name).is_file():
        return None, f"`{Path(name).name}` (GGUF, sha256 {hash_path(name)[:16]}...; not included)"
    return None, f"`{name}` (a local model, not included)"


def _card_metadata(base: str | None, adapter: bool, stage: str, identifier: str, repo_id: str, dataset_name: str,
                   source_format: str, test: dict, protocol_name: str) -> dict:  # fmt: skip
    """The model card's YAML header: base model, library, tags and (with test metrics) the Hub's model-index."""
    metadata: dict = {"base_model": base} if base else {}
    metadata.update(library_name="peft" if adapter else "transformers",
                    tags=["rlrec", "recommendation", "generative-recommendation", stage,
                          IDENTIFIERS[identifier].tag],
                    pipeline_tag="text-generation")  # fmt: skip
    if test:
        metadata["model-index"] = [{
            "name": repo_id.split("/")[-1],
            "results": [{
                "task": {"type": "text-generation", "name": "Sequential recommendation (next item)"},
                "dataset": {"name": dataset_name, "type": source_format, "split": "test"},
                "metrics": [{"type": key, "value": test[key], "name": f"{label} ({protocol_name})"}
                            for key, label in CARD_METRICS if key in test],
            }],
        }]  # fmt: skip
    return metadata


def _training_stages(recipe: Recipe, stage: str, training: dict) -> list[str]:
    """One line per stage the published model went through, with the settings a reader needs to reproduce it."""
    stages = ["SFT (next item" + (", item alignment tasks" if _has_alignment(recipe) else "") + ")"]
    if stage == "grpo":
        grpo = recipe.section("grpo")
        rewards = ", ".join(f"{name} x {weight:g}" for name, weight in grpo.rewards.items())
        stages.append(f"GRPO ({grpo.rollout} rollouts, G={grpo.num_generations}, rewards: {rewards}, "
                      f"{training.get('global_step', '?')} steps, kept step {training.get('saved_step', '?')} "
                      "by the validation guard)")  # fmt: skip
    elif stage == "dpo":
        dpo = recipe.section("dpo")
        counts = {"hard": dpo.negatives.hard, "history": dpo.negatives.history, "popular": dpo.negatives.popular,
                  "random": dpo.negatives.random}  # fmt: skip
        negatives = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
        rounds = len(training.get("rounds", [])) or dpo.rounds
        stages.append(f"{'S-DPO' if dpo.loss == 'sdpo' else 'DPO'} (beta {dpo.beta:g}, negatives per prompt: "
                      f"{negatives}, {rounds} round{'s' if rounds > 1 else ''}, kept step "
                      f"{training.get('saved_step', '?')} of the last round by the validation guard)")  # fmt: skip
    return stages


def model_card(stage_dir: Path, out: Path, repo_id: str) -> str:
    recipe = load_config(Recipe, stage_dir / "config.yaml")  # the stage's resolved recipe, strictly typed
    metrics = json.loads((stage_dir / "metrics.json").read_text())
    catalog_size = sum(1 for _ in (out / META_DIR / "catalog.jsonl").open())
    stage, run = stage_dir.name, recipe.name
    protocol = metrics.get("protocol", {})
    test = (metrics.get("test") or {}).get("metrics", {})
    adapter = (out / "adapter_config.json").is_file()
    data = recipe.section("data")
    identifier, source = data.prompt.identifier, data.source
    dataset_name = Path(source.path or source.format).name
    protocol_name = f"{protocol.get('split_method', '?')}, full catalogue of {protocol.get('num_items', '?')} items"

    base, base_text = _base_model(out)
    metadata = _card_metadata(base, adapter, stage, identifier, repo_id, dataset_name, source.format, test,
                              protocol_name)  # fmt: skip
    training = metrics.get("training", {})
    stages = _training_stages(recipe, stage, training)
    model_text = "full model"
    if adapter:
        model_text = "LoRA adapter on " + (base_text or "a from-scratch base model (in `base_model/`)")
    if training.get("trainable_parameters"):
        model_text += f", {training['trainable_parameters']:,} trained parameters"
    split = data.split
    users = (metrics.get("test") or {}).get("num_users", "?")
    loader = "`peft`" if adapter else "`transformers`"
    body = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A generative recommender trained with rlrec: given a user's history of items (oldest first), it generates "
        f"the next item as {_identifier_text(identifier)}. Decoding is constrained to the catalogue, so every "
        f"recommendation is one of the {catalog_size:,} items in `rlrec/catalog.jsonl`.",
        "",
        f"- Data: `{dataset_name}` ({source.format} format), histories truncated to the last "
        f"{split.max_history} items, split `{split.method}`.",
        f"- Model: {model_text}.",
        f"- Training stages: {' -> '.join(stages)}.",
        f"- Run `{run}`, stage `{stage}`; the resolved recipe is `rlrec/recipe.yaml`, inputs and versions in "
        "`rlrec/manifest.json`.",
        "",
        "## Test metrics",
        "",
        f"Protocol: {protocol_name} (no sampled negatives), test split, {users} users, the model's constrained "
        "top-K beam.",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {label} | {test[key]:.4f} |" for key, label in CARD_METRICS if key in test),
        "",
        "## Usage",
        "",
        "```python",
        "import rlrec",
        "",
        f'recommender = rlrec.load("{repo_id}")  # or a local folder',
        'recommender.recommend(["<item id>", "<item id>"], k=10)  # [(item id, log-probability), ...], best first',
        "```",
        "",
        f"The model alone loads with {loader}; prompts follow the template in `rlrec/recipe.yaml` (`data.prompt`), "
        "and items map to identifiers in `rlrec/catalog.jsonl`.",
    ]
    return "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n\n" + "\n".join(body) + "\n"


def _has_alignment(recipe: Recipe) -> bool:
    return recipe.sft is not None and bool(recipe.sft.tasks.title_to_sid or recipe.sft.tasks.sid_to_title)


def _identifier_text(identifier: str) -> str:
    return IDENTIFIERS[identifier].description


def publish(stage_dir: str | Path, repo_id: str, private: bool = False, dry_run: bool = False,
            out: str | Path | None = None) -> Path:  # fmt: skip
    """Export the folder, then (unless `dry_run`) create the repo and upload it; return the folder."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise RlrecError(f"--repo-id must look like user/name, got {repo_id!r}")
    stage_dir = Path(stage_dir)
    folder = export(stage_dir, out or stage_dir.parent / "publish" / stage_dir.name, repo_id)
    if dry_run:
        return folder
    from huggingface_hub import HfApi

    api = HfApi()  # token: HF_TOKEN, or the login cache; never passed through rlrec's arguments or files
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=f"rlrec: {stage_dir}",
                          ignore_patterns=[MARKER])  # fmt: skip
    except Exception as err:  # HTTP status, connection, offline mode: one clear line, the folder is kept
        raise RlrecError(f"Hub upload of {folder} to {repo_id} failed ({type(err).__name__}: {err}); the folder "
                         "is ready, rerun when the Hub is reachable") from None  # fmt: skip
    print(f"pushed {folder} to {url}")
    return folder
