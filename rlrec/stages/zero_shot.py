"""`rlrec baseline zero_shot`: the pretrained model of `sft.model`, before any training, scored like every trained
stage: the same prompts, the same trie-constrained beam search over the whole catalogue, the same users. The row
every table of a pretrained model needs, because it says what the model knew before the kit touched it, and so what
SFT, GRPO and DPO added.

Semantic-ID code tokens are added to the tokenizer as SFT adds them (their new embedding rows are the mean of the
others), so a zero-shot semantic-ID row measures a model that has never seen its identifiers; titles are words it
has read. Writes `runs/<name>/zero_shot/`: metrics.json (the same layout as sft/), ranks.json, config.yaml,
manifest.json.
"""

from __future__ import annotations

from rlrec.data.prepared import load_run_data
from rlrec.errors import ConfigError
from rlrec.evaluate import check_ks
from rlrec.models import build_for_training
from rlrec.recipe import Recipe
from rlrec.schema import SFTConfig, ZeroShotConfig
from rlrec.stages.runner import Timer, evaluate_stage, policy_report


def run(recipe: Recipe) -> dict:
    config: ZeroShotConfig = recipe.section("zero_shot")
    sft: SFTConfig = recipe.section("sft")
    if sft.model.from_scratch:
        raise ConfigError("zero_shot scores a pretrained model: set sft.model.path (a from-scratch model is random "
                          "before training)")  # fmt: skip
    timer = Timer()
    data = load_run_data(recipe.stage_dir("data"))
    check_ks(recipe.eval.ks, data)
    model, tokenizer, token_ids = build_for_training(sft.model, data.identifiers, [], recipe.seed)
    summary = {"model": sft.model.path, "parameters": sum(p.numel() for p in model.parameters()),
               "identifier_tokens": len(token_ids)}  # fmt: skip
    return evaluate_stage(recipe, "zero_shot", model.eval(), tokenizer, data, summary, config.eval_splits,
                          config.eval_max_users, timer)  # fmt: skip


def report(recipe: Recipe, metrics: dict) -> list[str]:
    """What `rlrec baseline zero_shot` prints."""
    return policy_report(recipe, "zero_shot", metrics)
