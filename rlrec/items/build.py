"""Build a collision-free semantic-ID index for a catalogue: item text -> embeddings -> residual quantisation.

Either load a ready `index.json` (`items.index_path`), or embed each item's text (`rlrec.items.embed`) and quantise
the embeddings with RQ-KMeans (`rlrec.items.quantize`) or RQ-VAE (`rlrec.items.rqvae`); then resolve collisions
(`rlrec.items.index`) so that every identifier names exactly one item. `rlrec items build` (`rlrec.stages.items`)
writes the result to `runs/<name>/items/`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from rlrec.data.io import load_json, require_file
from rlrec.data.types import Catalog
from rlrec.errors import ConfigError, RlrecError
from rlrec.items.embed import embed_texts, item_texts
from rlrec.items.index import SemanticIndex, collision_stats, index_stats, resolve_collisions
from rlrec.items.quantize import rq_kmeans
from rlrec.items.rqvae import train_rqvae
from rlrec.schema import ItemsConfig


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside, the caller's setting restored after. Multi-threaded CPU kernels do not add
    in a fixed order: on two threads, RQ-VAE training over the 4,344 Scientific embeddings gave different semantic
    IDs from the same seed on every run (no ID in common between two builds), so two runs of one recipe trained
    on different identifiers. On one thread the same seed gives the same IDs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def quantize(embeddings: np.ndarray, config: ItemsConfig, seed: int):
    """(codes, training history) of the configured quantiser, reproducible from `seed` (one thread)."""
    with one_thread():
        if config.quantizer == "rqvae":
            return train_rqvae(embeddings, config.rqvae, config.codebook_sizes, config.kmeans_iters, seed)
        return rq_kmeans(embeddings, config.codebook_sizes, config.kmeans_iters, seed, config.balanced), {}


def check_catalogue(catalog: Catalog, config: ItemsConfig) -> None:
    """Refuse what would build IDs from nothing: fewer than 2 items, or an attribute that no item has (a typo
    would otherwise embed titles only, with nothing but a counter in stats.json to say so)."""
    if len(catalog.items) < 2:
        raise RlrecError(f"items build: the catalogue has {len(catalog.items)} item(s); semantic IDs need at least 2")
    have = {name for item in catalog.items.values() for name, value in item.attributes.items() if str(value).strip()}
    missing = [name for name in config.attributes if name not in have]
    if missing:
        raise ConfigError(f"items.attributes: no item has {missing}; the catalogue's attributes are "
                          f"{sorted(have) or 'none'}")  # fmt: skip


def build_index(catalog: Catalog, config: ItemsConfig, seed: int, cache_dir: Path) -> tuple[SemanticIndex, dict]:
    """(collision-free index in catalogue order, stats: codebook utilisation, collisions before/after, sources)."""
    stats: dict = {}
    preferences, sizes = None, None
    if config.index_path:
        path = require_file(config.index_path, "a semantic-ID index.json")
        index = SemanticIndex.from_json(load_json(path), str(path)).align(catalog.ids(), str(path))
        stats["built_from"] = {"index_path": str(path)}
    else:
        check_catalogue(catalog, config)
        counts: Counter = Counter()
        texts = item_texts(catalog, config.attributes, config.max_attribute_chars, counts)
        t0 = time.time()
        embeddings, cache_file, hit = embed_texts(texts, config.encoder, config.batch_size, cache_dir)
        t1 = time.time()
        quantized, training = quantize(embeddings, config, seed)
        sizes = config.codebook_sizes
        preferences = quantized.last_level_preferences()
        index = SemanticIndex.from_codes(catalog.ids(), quantized.codes)
        stats["built_from"] = {
            "encoder": config.encoder,
            "text_fields": ["title", *config.attributes],
            "embedding_dim": int(embeddings.shape[1]),
            "embedding_cache": str(cache_file),
            "embedding_cache_hit": hit,
            "embedding_seconds": round(t1 - t0, 2),
            "quantizer": config.quantizer,
            "quantizer_seconds": round(time.time() - t1, 2),
            "balanced": config.balanced,
            "text_fallbacks": dict(sorted(counts.items())),
            **({"rqvae_final": training} if training else {}),
        }
    before = collision_stats(index.codes)
    resolved, changed = resolve_collisions(index, config.collision, sizes[-1] if sizes else None, preferences)
    stats.update(index_stats(resolved, sizes))
    stats["collisions_before"] = before
    stats["collisions_after"] = collision_stats(resolved.codes)
    stats["resolution"] = {"method": config.collision, "items_changed": changed}
    stats["distinct_identifiers"] = stats["collisions_after"]["distinct_identifiers"]
    return resolved, stats
