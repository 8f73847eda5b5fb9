"""A trained stage as a recommender object: `rlrec.load(path_or_repo_id).recommend(history, k)`.

Reads the folder `rlrec publish` writes (locally with `--dry-run`, or from the Hub): the model or adapter with its
tokenizer at the root, `base_model/` when the adapter was trained on a from-scratch base, and `rlrec/` with the
resolved recipe, the catalogue and the stage's metrics. Recommendations come from the same trie-constrained beam
search and the same prompt rendering as evaluation, so scoring `recommend_batch` on the run's test rows reproduces
the stage's `metrics.json`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from rlrec.config import from_dict
from rlrec.data.io import load_json
from rlrec.data.prepared import read_catalog
from rlrec.decoding import recommend
from rlrec.decoding.inputs import ModelInputs
from rlrec.errors import RlrecError
from rlrec.items.identifiers import IDENTIFIERS
from rlrec.items.index import SemanticIndex
from rlrec.models import load_model
from rlrec.prompts import prompt_messages
from rlrec.schema import DataConfig, EvalConfig

META_DIR = "rlrec"  # the kit's files inside a published folder


@dataclass
class Recommender:
    model: object
    tokenizer: object
    catalog: list[dict]  # {"item_id", "title", "identifier", "attributes"} in catalogue order
    recipe: dict  # the resolved recipe the stage was trained with
    metrics: dict  # the stage's metrics.json

    def __post_init__(self) -> None:
        # The recipe's sections, parsed as strictly as the CLI parses them (a recipe from a newer rlrec fails here)
        data = from_dict(DataConfig, self.recipe["data"])
        self.prompt = data.prompt
        self.max_history = data.split.max_history
        self.eval = from_dict(EvalConfig, self.recipe.get("eval") or {})
        self.identifiers = {item["item_id"]: item["identifier"] for item in self.catalog}
        self.titles = {item["item_id"]: item["title"] for item in self.catalog}
        check_tokenizer_coverage(self.tokenizer, self.identifiers)
        self.inputs = ModelInputs.build(self.tokenizer, self.identifiers, self.prompt)
        self.trie = self.inputs.trie

    def recommend(self, history: Iterable[str], k: int = 10) -> list[tuple[str, float]]:
        """Top-k (item id, log-probability) for one history of item ids, oldest first (any iterable, read once).
        `k` is capped at the catalogue size; with history exclusion fewer items can come back."""
        return self.recommend_batch([history], k)[0]

    def recommend_batch(self, histories: Iterable[Iterable[str]], k: int = 10) -> list[list[tuple[str, float]]]:
        """Top-k per history, batched as in evaluation (the recipe's eval batch size, beam width and history
        exclusion), so the run's test rows give the stage's test metrics. Histories may be any iterables (each is
        read once); `k` and the beam width are capped at the catalogue size."""
        if isinstance(histories, str):
            raise RlrecError("histories are lists of item ids, oldest first (e.g. [['12', '7']]), not a string")
        histories = list(histories)
        if any(isinstance(h, str) for h in histories):
            raise RlrecError("a history is a list of item ids, oldest first (e.g. ['12', '7']), not a string")
        histories = [list(h) for h in histories]  # generators are read here, once
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise RlrecError(f"k must be a positive integer, got {k!r}")
        unknown = sorted({item for history in histories for item in history if item not in self.identifiers})
        if unknown:
            raise RlrecError(f"{len(unknown)} history item id(s) not in the catalogue, e.g. {unknown[:5]}")
        histories = [list(h)[-self.max_history :] for h in histories]
        rows = {"prompt": [prompt_messages(h, self.identifiers, self.prompt) for h in histories], "history": histories}
        prompts = self.inputs.prompt_ids(self.tokenizer, rows)
        return recommend(self.model, self.tokenizer, prompts, k=k, trie=self.trie,
                         beam_width=max(self.eval.beam_width or k, k), batch_size=self.eval.batch_size,
                         exclude=histories if self.eval.exclude_history else None)  # fmt: skip


def check_tokenizer_coverage(tokenizer, identifiers: dict[str, str]) -> None:
    """Every identifier must be made of tokens the tokenizer knows: an unknown one encodes to the unk token, and the
    model would score an item it cannot name (seen: -26.8 for every such item, no error)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    unknown = [item for item, text in identifiers.items()
               if unk in tokenizer(text, add_special_tokens=False)["input_ids"]]  # fmt: skip
    if unknown:
        example = f"item {unknown[0]} ({identifiers[unknown[0]]!r})"
        raise RlrecError(f"{len(unknown)} catalogue identifier(s) hold tokens the tokenizer does not know, e.g. "
                         f"{example}: the catalogue and the model do not match")  # fmt: skip


def load(path_or_repo_id: str | Path, device: str | None = None, revision: str | None = None) -> Recommender:
    """Load a published folder, or download one from the Hub by repo id (token from the environment or login)."""
    path = Path(path_or_repo_id)
    if not path.exists():
        if str(path_or_repo_id).count("/") != 1:
            raise RlrecError(f"{path_or_repo_id}: neither a local folder nor a Hub repo id (user/name)")
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(str(path_or_repo_id), revision=revision))
        except Exception as err:  # offline, unknown repo, no access: huggingface_hub raises several types
            raise RlrecError(
                f"{path_or_repo_id}: no such local folder, and the Hub download failed "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            ) from None
    meta = path / META_DIR
    if not (meta / "catalog.jsonl").is_file():
        raise RlrecError(f"{path}: not a published rlrec folder (no {META_DIR}/catalog.jsonl); see `rlrec publish`")
    catalog = read_catalog(meta / "catalog.jsonl")
    recipe = yaml.safe_load((meta / "recipe.yaml").read_text(encoding="utf-8"))
    kind = (recipe.get("data") or {}).get("prompt", {}).get("identifier", "title")
    if IDENTIFIERS[kind].needs_index:  # the index must cover the catalogue
        index = meta / "index.json"
        if not index.is_file():
            raise RlrecError(f"{path}: no {META_DIR}/index.json, but the recipe's {kind} identifiers read one")
        SemanticIndex.from_json(load_json(index), str(index)).align([item["item_id"] for item in catalog], str(index))
    model, tokenizer = load_model(path, device=device)
    check_weights(model, path)
    metrics = json.loads((meta / "metrics.json").read_text(encoding="utf-8"))
    return Recommender(model, tokenizer, catalog, recipe, metrics)


def check_weights(model, path: Path) -> None:
    """Zeroed or non-finite embeddings (a corrupted or half-written file) load without a word and score every item
    alike; refuse them. Only the input and output embeddings are read: every token passes through them."""
    import torch

    for name, layer in (
        ("input embeddings", model.get_input_embeddings()),
        ("output layer", model.get_output_embeddings()),
    ):
        # under PEFT's token adapters `weight` is the wrapper's merged matrix: the base rows and the trained ones
        weight = getattr(layer, "weight", None)
        if weight is None:
            continue
        if not bool(torch.isfinite(weight).all()):
            raise RlrecError(f"{path}: the model's {name} hold NaN or infinite values; the weights file is corrupted")
        if not bool(weight.any()):
            raise RlrecError(f"{path}: the model's {name} are all zero; the weights file is corrupted or empty")
