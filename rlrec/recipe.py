"""The recipe: one YAML schema for every command. A recipe names the run and holds one section per stage; each
command reads the run fields and its own section, so a single file can drive one stage or the whole pipeline.

    name: ml100k            # runs/<name>/...
    output_dir: runs
    seed: 0
    data: {source: ..., split: ..., prompt: ...}
    items: {quantizer: rqkmeans, codebook_sizes: [256, 256, 256], ...}   # semantic IDs (optional)
    sft: {...}  grpo: {...}  dpo: {...}  eval: {...}  pipeline: {accelerate_config: ...}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlrec.baselines.sasrec import SASRecConfig
from rlrec.data.config import DataConfig
from rlrec.errors import ConfigError
from rlrec.evaluate import EvalConfig
from rlrec.items.config import ItemsConfig
from rlrec.pipeline import PipelineConfig
from rlrec.stages.dpo import DPOStageConfig
from rlrec.stages.grpo import GRPOStageConfig
from rlrec.stages.sft import SFTStageConfig


@dataclass
class Recipe:
    name: str
    output_dir: str = "runs"
    seed: int = 0
    data: DataConfig | None = None
    items: ItemsConfig | None = None
    sasrec: SASRecConfig | None = None
    sft: SFTStageConfig | None = None
    grpo: GRPOStageConfig | None = None
    dpo: DPOStageConfig | None = None
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
