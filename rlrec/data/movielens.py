"""MovieLens readers: ML-100K (`u.data`, `u.item`) and ML-1M (`ratings.dat`, `movies.dat`) by one code path.

The two releases differ only in file names, separators and where genres live, so a small `Layout` table describes
each and one function reads both. Item files are Latin-1 (ML-100K has byte 0xE9 in titles).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rlrec.data.filters import Event, events_to_interactions
from rlrec.data.io import iter_lines, require_file
from rlrec.data.types import BadRows, Catalog, Item, RawData
from rlrec.errors import DataError
from rlrec.schema import SourceConfig

# u.genre order of the 19 genre flags in u.item (used when u.genre is absent).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


@dataclass(frozen=True)
class Layout:
    ratings: str
    ratings_sep: str
    items: str
    items_sep: str


LAYOUTS = {
    "ml-100k": Layout(ratings="u.data", ratings_sep="\t", items="u.item", items_sep="|"),
    "ml-1m": Layout(ratings="ratings.dat", ratings_sep="::", items="movies.dat", items_sep="::"),
}


def detect_layout(folder: Path) -> Layout:
    for layout in LAYOUTS.values():
        if (folder / layout.ratings).is_file():
            return layout
    names = " or ".join(f"{lay.ratings} + {lay.items}" for lay in LAYOUTS.values())
    raise DataError(f"{folder}: not a MovieLens folder (expected {names})")


def _genres_100k(folder: Path, encoding: str) -> tuple[str, ...]:
    path = folder / "u.genre"
    if not path.is_file():
        return ML100K_GENRES
    names = [text.split("|")[0] for _, text in iter_lines(path, encoding) if text.strip()]
    return tuple(names)


def read_items(folder: Path, layout: Layout, encoding: str, bad: BadRows) -> Catalog:
    path = require_file(folder / layout.items, f"the MovieLens item file {layout.items}")
    genre_names = _genres_100k(folder, encoding) if layout.items == "u.item" else ()
    items: dict[str, Item] = {}
    for line, text in iter_lines(path, encoding):
        if not text.strip():
            continue
        fields = text.split(layout.items_sep)
        if layout.items == "u.item":
            expected = 5 + len(genre_names)
            if len(fields) != expected:
                bad("bad_item_row", f"{path}:{line}: expected {expected} '|'-separated fields, got {len(fields)}")
                continue
            flags = fields[5:]
            genres = [name for name, flag in zip(genre_names, flags, strict=True) if flag.strip() == "1"]
            attributes = {"genres": ", ".join(genres), "release_date": fields[2]}
        else:
            if len(fields) != 3:
                bad("bad_item_row", f"{path}:{line}: expected 3 '::'-separated fields (id, title, genres)")
                continue
            attributes = {"genres": ", ".join(g for g in fields[2].split("|") if g)}
        item_id, title = fields[0].strip(), fields[1].strip()
        if not item_id:
            bad("bad_item_row", f"{path}:{line}: empty movie id")
            continue
        if item_id in items:
            bad("duplicate_item", f"{path}:{line}: movie id {item_id} appears twice")
            continue
        items[item_id] = Item(item_id, title, attributes)
    return Catalog(items)


def read_events(
    path: Path, layout: Layout, catalog: Catalog, min_rating: float | None, bad: BadRows, skipped: Counter
) -> list[Event]:
    sep = layout.ratings_sep
    shown = "tab" if sep == "\t" else repr(sep)
    events: list[Event] = []
    for line, text in iter_lines(path, "utf-8"):
        if not text.strip():
            continue
        fields = text.split(sep)
        if len(fields) != 4:
            bad(
                "bad_field_count",
                f"{path}:{line}: expected 4 {shown}-separated fields (user, item, rating, timestamp), "
                f"got {len(fields)}: {text!r}",
            )
            continue
        user, item, rating_text, time_text = (f.strip() for f in fields)
        try:
            rating, timestamp = float(rating_text), int(time_text)
        except ValueError:
            bad("bad_value", f"{path}:{line}: expected a numeric rating and an integer timestamp, got {text!r}")
            continue
        if not user or not item:
            bad("bad_value", f"{path}:{line}: empty user or item id")
            continue
        if item not in catalog:
            bad("unknown_item", f"{path}:{line}: item {item} is not in {layout.items}")
            continue
        if min_rating is not None and rating < min_rating:
            skipped["below_min_rating"] += 1
            continue
        events.append(Event(user, item, timestamp))
    return events


def read_movielens(config: SourceConfig) -> RawData:
    folder = Path(config.path)
    if not folder.is_dir():
        raise DataError(f"missing folder: {folder} (expected a MovieLens release with u.data or ratings.dat)")
    layout = detect_layout(folder)
    encoding = config.encoding or "latin-1"
    bad = BadRows(config.on_error)
    catalog = read_items(folder, layout, encoding, bad)
    skipped: Counter = Counter()
    ratings_path = require_file(folder / layout.ratings, f"the MovieLens ratings file {layout.ratings}")
    events = read_events(ratings_path, layout, catalog, config.min_rating, bad, skipped)
    interactions = events_to_interactions(events, config.drop_repeat_items, skipped)
    return bad.attach(RawData(catalog=catalog, interactions=interactions, skipped=skipped))
