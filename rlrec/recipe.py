"""The recipe: one YAML schema for every command, and the one order in which stages run.

A recipe names the run and holds one section per stage (the section classes are in `rlrec.schema`); each command
reads the run fields and its own section, so one file can drive one stage or the whole pipeline.

    name: ml100k            # runs/<name>/...
    output_dir: runs
    seed: 0
    data: {source: ..., split: ..., prompt: ...}
    items: {quantizer: rqkmeans, codebook_sizes: [256, 256, 256], ...}   # semantic IDs (optional)
    sasrec: {...}  sft: {...}  grpo: {...}  dpo: {...}  zero_shot: {...}  eval: {...}  pipeline: {...}

`STAGES` is the single stage order: the pipeline runs it, the CLI and `rlrec eval` look stages up in it. A stage is
a module `rlrec.stages.<name>` with `run(recipe) -> dict` writing `runs/<name>/<stage>/` (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rlrec.config import to_dict
from rlrec.errors import ConfigError
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
    """One stage of the pipeline: module `rlrec.stages.<name>`, folder `runs/<run>/<name>/`."""

    name: str
    reads: tuple[str, ...]  # the recipe sections it reads: its pipeline key changes when one of them does
    optional: bool = False  # planned only when the recipe has a section of the stage's name
    launched: bool = False  # a training stage: run under `accelerate launch` by the pipeline
    policy: bool = False  # saves `<stage>/model`, which a later stage can start from (`init`) or evaluate


STAGES: tuple[Stage, ...] = (
    Stage("items", reads=("data", "items"), optional=True),
    Stage("data", reads=("data", "items")),
    Stage("most_popular", reads=("eval",)),
    Stage("sasrec", reads=("sasrec", "eval"), optional=True),
    Stage("sft", reads=("sft", "eval"), optional=True, launched=True, policy=True),
    Stage("grpo", reads=("grpo", "eval"), optional=True, launched=True, policy=True),
    Stage("dpo", reads=("dpo", "eval"), optional=True, launched=True, policy=True),
    # after the training stages: a change to its own section reruns nothing else (the keys are chained)
    Stage("zero_shot", reads=("sft", "zero_shot", "eval"), optional=True),
    Stage("eval", reads=("eval",)),
)
STAGE = {stage.name: stage for stage in STAGES}
ORDER: tuple[str, ...] = tuple(stage.name for stage in STAGES)
POLICY_STAGES: tuple[str, ...] = tuple(stage.name for stage in STAGES if stage.policy)
StageName = Literal["items", "data", "most_popular", "sasrec", "sft", "grpo", "dpo", "zero_shot", "eval"]


@dataclass
class PipelineConfig:
    stages: list[StageName] | None = None  # default: every stage whose section the recipe has (see STAGES)
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
    eval: EvalConfig | None = None
    pipeline: PipelineConfig | None = None

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
        config = self.pipeline or PipelineConfig()
        if config.stages is not None:
            wanted = set(config.stages)
        else:
            wanted = {s.name for s in STAGES if not s.optional or getattr(self, s.name) is not None}
        stages = [s for s in STAGES if s.name in wanted]
        for stage in stages:
            if stage.optional and getattr(self, stage.name) is None:
                raise ConfigError(f"pipeline.stages has '{stage.name}' but the recipe has no '{stage.name}' section")
        return [s.name for s in stages]

    def latest_model(self) -> Path | None:
        """The model of the run's last policy stage in the stage order (dpo, grpo, then sft), if any."""
        for stage in reversed(POLICY_STAGES):
            path = self.stage_dir(stage) / "model"
            if path.is_dir():
                return path
        return None


def stage_inputs(recipe: Recipe, stage: str) -> dict:
    """What a training stage's checkpoints were made from: the seed and the recipe sections read by the stage and
    by every stage before it (the pipeline's key, as a readable dict). A rerun resumes only from checkpoints made
    with the same inputs (rlrec.stages.training.last_checkpoint)."""
    upto = ORDER[: ORDER.index(stage) + 1]
    names = sorted({name for s in STAGES if s.name in upto for name in s.reads})
    return {"seed": recipe.seed, "sections": {name: to_dict(getattr(recipe, name, None)) for name in names}}
