"""The recipe: one YAML schema for every command, and the one order in which stages run.

A recipe names the run and holds one section per stage (the section classes are in `rlrec.schema`); each command
reads the run fields and its own section, so one file can drive one stage or the whole pipeline.

    name: ml100k            # runs/<name>/...
    output_dir: runs
    seed: 0
    data: {source: ..., split: ..., prompt: ...}
    items: {quantizer: rqkmeans, codebook_sizes: [256, 256, 256], ...}   # semantic IDs (optional)
    sasrec: {...}  sft: {...}  grpo: {...}  dpo: {...}  zero_shot: {...}  eval: {...}  pipeline: {...}

`STAGES` is the stage graph, in a run order: each stage names the sections it reads and the stages it needs; the
pipeline's keys and the training stages' resume checks come from it (`stage_inputs`), the CLI's stage commands are
its rows, and `rlrec eval` looks stages up in it. A stage is
a module `rlrec.stages.<name>` with `run(recipe) -> dict` writing `runs/<name>/<stage>/` (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rlrec.config import to_dict
from rlrec.errors import ConfigError
from rlrec.manifest import fingerprint
from rlrec.rewards import check_rewards
from rlrec.schema import (
    DataConfig,
    DPOConfig,
    EvalConfig,
    GRPOConfig,
    ItemsConfig,
    SASRecConfig,
    SFTConfig,
    ZeroShotConfig,
)


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline: module `rlrec.stages.<name>`, folder `runs/<run>/<name>/`, and what it depends on.

    A stage's inputs are the recipe sections it `reads` (a section or a dotted part of one) and the stages it
    `needs` (their outputs), plus the conditional ones of `stage_needs`. They define its pipeline key and the record
    its checkpoints carry (`stage_inputs`): a change reruns the stages that read it and those downstream, no other."""

    name: str
    reads: tuple[str, ...]  # recipe sections (or dotted parts, e.g. "sft.model") the stage reads
    needs: tuple[str, ...] = ()  # stages whose outputs it reads, always (see stage_needs for the conditional ones)
    optional: bool = False  # planned only when the recipe has a section of the stage's name
    launched: bool = False  # a training stage: run under `accelerate launch` by the pipeline
    policy: bool = False  # saves `<stage>/model`, which a later stage can start from (`init`) or evaluate
    scored: bool = True  # writes test metrics of one system: a row of the pipeline's summary table
    words: tuple[str, ...] = ()  # its command: `rlrec <words...> --config recipe.yaml`
    help: str = ""


# In a valid run order: every stage comes after the stages it needs (a test checks it for every recipe).
STAGES: tuple[Stage, ...] = (
    Stage("items", reads=("data.source", "items"), optional=True, scored=False, words=("items", "build"),
          help="item text -> collision-free semantic-ID index in runs/<name>/items"),
    Stage("data", reads=("data", "items"), scored=False, words=("data", "prepare"),
          help="interaction logs -> recommendation-as-text datasets in runs/<name>/data"),
    Stage("most_popular", reads=("eval",), needs=("data",), words=("baseline", "most_popular"),
          help="score the most-popular baseline on the run's split"),
    Stage("sasrec", reads=("sasrec", "eval"), needs=("data",), optional=True, words=("baseline", "sasrec"),
          help="train SASRec with early stopping on valid NDCG@10, then score it"),
    Stage("sft", reads=("sft", "eval"), needs=("data",), optional=True, launched=True, policy=True, words=("sft",),
          help="supervised fine-tuning (LoRA or full) on history -> next item, then evaluation"),
    Stage("grpo", reads=("grpo", "eval"), needs=("data",), optional=True, launched=True, policy=True,
          words=("grpo",), help="GRPO from the SFT model, verifiable ranking rewards, trie-constrained rollouts"),
    Stage("dpo", reads=("dpo", "eval"), needs=("data",), optional=True, launched=True, policy=True, words=("dpo",),
          help="DPO or multi-negative S-DPO from the SFT model, with mined hard negatives"),
    # the untrained base model: it reads the model SFT starts from, not how SFT trains it
    Stage("zero_shot", reads=("sft.model", "zero_shot", "eval"), needs=("data",), optional=True,
          words=("baseline", "zero_shot"), help="score the pretrained model of sft.model before any training"),
    Stage("eval", reads=("eval",), needs=("data",), scored=False, words=("eval",),
          help="full-catalogue evaluation of the run's model and baselines -> runs/<name>/eval"),
)  # fmt: skip
STAGE = {stage.name: stage for stage in STAGES}
ORDER: tuple[str, ...] = tuple(stage.name for stage in STAGES)
POLICY_STAGES: tuple[str, ...] = tuple(stage.name for stage in STAGES if stage.policy)


@dataclass
class PipelineConfig:
    stages: list[str] | None = None  # default: every stage whose section the recipe has (see STAGES)
    accelerate_config: str = "accelerate_configs/single.yaml"  # for the training stages
    launcher: Literal["accelerate", "python"] = "accelerate"  # python: `python -m rlrec.stages.<x>`, no launcher

    def __post_init__(self) -> None:
        if self.stages is not None:
            unknown = [s for s in self.stages if s not in ORDER]
            if unknown:
                raise ConfigError(f"pipeline.stages: unknown stage(s) {unknown}; choose from {list(ORDER)}")


@dataclass
class Recipe:
    name: str
    output_dir: str = "runs"
    seed: int = 0
    data: DataConfig | None = None
    items: ItemsConfig | None = None
    sasrec: SASRecConfig | None = None
    sft: SFTConfig | None = None
    grpo: GRPOConfig | None = None
    dpo: DPOConfig | None = None
    zero_shot: ZeroShotConfig | None = None
    # every run evaluates and may run the pipeline: these two sections always exist, with their defaults
    eval: EvalConfig = field(default_factory=EvalConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigError(f"name must be a plain folder name, got {self.name!r}")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def section(self, name: str):
        value = getattr(self, name)
        if value is None:
            raise ConfigError(f"this command needs a '{name}' section in the recipe")
        return value

    def planned_stages(self) -> list[str]:
        """The stages `rlrec pipeline` runs, in order: `pipeline.stages`, else every stage that is not optional
        and every optional one whose section the recipe has."""
        config = self.pipeline
        if config.stages is not None:
            wanted = set(config.stages)
        else:
            wanted = {s.name for s in STAGES if not s.optional or getattr(self, s.name) is not None}
        stages = [s for s in STAGES if s.name in wanted]
        for stage in stages:
            if stage.optional and getattr(self, stage.name) is None:
                raise ConfigError(f"pipeline.stages has '{stage.name}' but the recipe has no '{stage.name}' section")
        return [s.name for s in stages]

    def check(self) -> None:
        """What can be checked before any model or dataset loads: the GRPO reward names resolve (a misspelled one
        fails in a second, naming the nearest, instead of after a model load) and suit the rollout. Run by the CLI,
        the pipeline and the GRPO stage itself."""
        if self.grpo is not None:
            check_rewards(self.grpo.rewards, self.grpo.rollout)

    def latest_model(self) -> Path | None:
        """The model of the run's last policy stage in the stage order (dpo, grpo, then sft), if any."""
        for stage in reversed(POLICY_STAGES):
            path = self.stage_dir(stage) / "model"
            if path.is_dir():
                return path
        return None


def stage_needs(recipe: Recipe, stage: str) -> list[str]:
    """The stages whose outputs `stage` reads under this recipe: its fixed `needs` plus the ones its settings add
    (the policy a post-training stage starts from, the SASRec teacher of a `teacher` reward, the models and
    baselines `eval` scores), in run order."""
    needs = set(STAGE[stage].needs)
    if stage == "data" and recipe.items is not None:
        needs.add("items")
    section = getattr(recipe, stage, None) if stage in ("grpo", "dpo") else None
    if section is not None and section.init in POLICY_STAGES:
        needs.add(section.init)
    if stage == "grpo" and section is not None and "teacher" in section.rewards:
        needs.add("sasrec")
    if stage == "eval":
        needs.update(name for name in recipe.eval.baselines if name in STAGE)
        if recipe.eval.model is None:  # the run's latest model: any of its planned policy stages
            needs.update(name for name in POLICY_STAGES if getattr(recipe, name) is not None)
    return [name for name in ORDER if name in needs]


def _read(recipe: Recipe, path: str):
    value = recipe
    for part in path.split("."):
        value = getattr(value, part, None) if value is not None else None
    return to_dict(value)


def _file_paths(value, key: str = "") -> dict[str, str]:
    """The local paths a recipe section names (`path`, `*_path` keys: data files, indexes, model folders, GGUF
    files), by dotted key. A hub id or a path that does not exist is not a file here; the section holds its text."""
    if isinstance(value, dict):
        found: dict[str, str] = {}
        for name, item in value.items():
            found.update(_file_paths(item, f"{key}.{name}" if key else name))
        return found
    name = key.rsplit(".", 1)[-1]
    if (name == "path" or name.endswith("_path")) and isinstance(value, str) and Path(value).exists():
        return {key: value}
    return {}


def stage_inputs(recipe: Recipe, stage: str) -> dict:
    """Everything a stage's output depends on, as a readable dict: the seed, the recipe sections it reads and, for
    each stage it needs, that stage's inputs (recursively). The pipeline's key is its hash (rlrec.pipeline); a
    training stage records it beside its checkpoints and resumes only from checkpoints with the same inputs
    (rlrec.training.arguments.last_checkpoint). A stage's inputs never hold a sibling's: editing `sasrec` changes
    SFT's inputs only if SFT read it.

    `files` holds the content fingerprint (`rlrec.manifest.fingerprint`) of every local file or folder those
    sections name: an interactions file edited in place reruns the stages that read it, and a resume across it is
    refused with the file named."""
    sections = {path: _read(recipe, path) for path in STAGE[stage].reads}
    files = {key: f"{path} ({fingerprint(path)})" for key, path in _file_paths(sections).items()}
    return {"stage": stage, "seed": recipe.seed, "sections": sections, "files": files,
            "needs": {need: stage_inputs(recipe, need) for need in stage_needs(recipe, stage)}}  # fmt: skip
