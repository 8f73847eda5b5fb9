"""The data layer: readers for real interaction logs -> `RawData` (catalogue + interactions or given splits).

READERS maps `source.format` to its reader; `read_source` also applies the filters every format shares.
"""

from __future__ import annotations

from rlrec.data.filters import drop_repeats, kcore
from rlrec.data.generic import read_generic
from rlrec.data.lcrec import read_lcrec
from rlrec.data.minionerec import read_minionerec
from rlrec.data.movielens import read_movielens
from rlrec.data.synthetic import generate
from rlrec.data.types import Catalog, Interactions, Item, RawData, Sample
from rlrec.errors import ConfigError
from rlrec.schema import DataConfig, SourceConfig

READERS = {
    "movielens": read_movielens,
    "lcrec": read_lcrec,
    "minionerec": read_minionerec,
    "generic": read_generic,
    "synthetic": lambda config: generate(config.synthetic),
}
# Formats whose raw rows carry ratings (min_rating applies while reading).
RATED = ("movielens", "generic")
# Event readers (timestamped rows): they drop repeated items while sorting each user's events; the sequence
# formats (one line a user) get drop_repeat_items here. Today the same two formats as RATED, by coincidence.
EVENT_READERS = ("movielens", "generic")


def read_source(config: SourceConfig) -> RawData:
    if config.min_rating is not None and config.format not in RATED:
        raise ConfigError(f"source.min_rating: format '{config.format}' has no ratings")
    raw = READERS[config.format](config)
    if raw.interactions is not None:
        # Event-based readers apply drop_repeat_items while sorting; sequence sources get it here.
        if config.drop_repeat_items and config.format not in EVENT_READERS:
            raw.interactions = drop_repeats(raw.interactions, raw.skipped)
        raw.interactions = kcore(raw.interactions, config.kcore, raw.skipped)
    elif config.kcore or config.drop_repeat_items:
        raise ConfigError(f"source.kcore / drop_repeat_items need per-user sequences; '{config.format}' is pre-split")
    return raw


__all__ = ["READERS", "Catalog", "DataConfig", "Interactions", "Item", "RawData", "Sample", "read_source"]
