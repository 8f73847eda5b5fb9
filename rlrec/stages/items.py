"""`rlrec items build`: the catalogue's item text -> a collision-free semantic-ID index in `runs/<name>/items/`.

    index.json      {item_id: ["<a_12>", "<b_3>", "<c_200>"]}, collision-free, every catalogue item
    stats.json      codebook utilisation per level, collisions before/after, prefix sharing, text fallbacks
    embeddings/     the embeddings cache (kept across rebuilds; keyed by texts and encoder)
    config.yaml, manifest.json
The method is `rlrec.items.build`; `rlrec data prepare` with `prompt.identifier: sid` then renders items by it.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlrec.data import read_source
from rlrec.items.build import build_index
from rlrec.recipe import Recipe
from rlrec.schema import ItemsConfig
from rlrec.stages.runner import Timer, write_outputs


def run(recipe: Recipe) -> dict:
    config: ItemsConfig = recipe.section("items")
    catalog = read_source(recipe.section("data").source).catalog
    out = recipe.stage_dir("items")
    out.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    cache_dir = Path(config.cache_dir) if config.cache_dir else out / "embeddings"
    index, stats = build_index(catalog, config, recipe.seed, cache_dir)
    (out / "index.json").write_text(json.dumps(index.to_json()) + "\n", encoding="utf-8")
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    write_outputs(recipe, "items", [p for p in (recipe.section("data").source.path, config.index_path) if p], timer)
    return stats


def report(recipe: Recipe, stats: dict) -> list[str]:
    """What `rlrec items build` prints."""
    before, after = stats["collisions_before"], stats["collisions_after"]
    first = stats["utilisation"][0]
    return [
        f"wrote {recipe.stage_dir('items')}",
        f"  items {stats['num_items']:,}  levels {stats['levels']}  distinct identifiers "
        f"{stats['distinct_identifiers']:,}",
        f"  collisions: {before['colliding_items']:,} colliding items before, {after['colliding_items']} after "
        f"({stats['resolution']['method']}, {stats['resolution']['items_changed']} items changed)",
        f"  level {first['level']} utilisation: {first['codes_used']}/{first['codebook_size']} codes "
        f"({first['share']:.1%})",
    ]
