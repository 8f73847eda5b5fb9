"""`rlrec items build`: the catalogue's item text -> a collision-free semantic-ID index in `runs/<name>/items/`.

Steps: read the catalogue (the recipe's `data.source`), then either load a ready `index.json` (`items.index_path`)
or embed each item's text and quantise the embeddings (RQ-KMeans or RQ-VAE); resolve collisions; write
    index.json      {item_id: ["<a_12>", "<b_3>", "<c_200>"]}, collision-free, every catalogue item
    stats.json      codebook utilisation per level, collisions before/after, prefix sharing, text fallbacks
    embeddings/     the embeddings cache (kept across rebuilds; keyed by texts and encoder)
    config.yaml, manifest.json
`rlrec data prepare` with `prompt.identifier: sid` then renders items by this index.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from rlrec.config import dump_config
from rlrec.data import read_source
from rlrec.data.io import load_json, require_file
from rlrec.items.config import ItemsConfig
from rlrec.items.embed import embed_texts, item_texts
from rlrec.items.index import SemanticIndex, collision_stats, index_stats, resolve_collisions
from rlrec.items.quantize import rq_kmeans
from rlrec.items.rqvae import train_rqvae
from rlrec.manifest import write_manifest
from rlrec.recipe import Recipe


def quantize(embeddings: np.ndarray, config: ItemsConfig, seed: int):
    if config.quantizer == "rqvae":
        return train_rqvae(embeddings, config.rqvae, config.codebook_sizes, config.kmeans_iters, seed)
    return rq_kmeans(embeddings, config.codebook_sizes, config.kmeans_iters, seed, config.balanced), {}


def build(recipe: Recipe) -> dict:
    config: ItemsConfig = recipe.section("items")
    catalog = read_source(recipe.section("data").source).catalog
    out = recipe.stage_dir("items")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    stats: dict = {}
    preferences, sizes = None, None
    if config.index_path:
        path = require_file(config.index_path, "a semantic-ID index.json")
        index = SemanticIndex.from_json(load_json(path), str(path)).align(catalog.ids(), str(path))
        stats["built_from"] = {"index_path": str(path)}
    else:
        counts: Counter = Counter()
        texts = item_texts(catalog, config.attributes, config.max_attribute_chars, counts)
        cache_dir = Path(config.cache_dir) if config.cache_dir else out / "embeddings"
        t0 = time.time()
        embeddings, cache_file, hit = embed_texts(texts, config.encoder, config.batch_size, cache_dir)
        t1 = time.time()
        quantized, training = quantize(embeddings, config, recipe.seed)
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

    (out / "index.json").write_text(json.dumps(resolved.to_json()) + "\n", encoding="utf-8")
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    dump_config(recipe, out / "config.yaml")
    inputs = [p for p in (recipe.section("data").source.path, config.index_path) if p]
    write_manifest(out, inputs, recipe.seed, time.time() - started, stage="items")
    return stats
