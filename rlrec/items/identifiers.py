"""Item identifiers: the text a model reads in a history and writes as its answer, one string per item.

Renderers, chosen by `prompt.identifier`:
- `title`: the item's title. Titles are not unique in real catalogues (ML-100K has 18 duplicated titles), and an
  identifier must name exactly one item for decoding and evaluation, so duplicates get the item id appended
  (`Chasing Amy (1997) [id 246]`); empty titles fall back to `item <id>`; titles longer than
  `prompt.max_title_chars` are cut there (a scraped 1 MB "title" would otherwise make every prompt and every beam
  unbounded). All three are counted in stats.json `identifier_notes` and printed by `data prepare`.
- `id`: the item id as text.
- `sid`: the semantic ID, the item's codes concatenated (`<a_12><b_3><c_200>`), from an index in the
  LC-Rec `index.json` format. The index must cover every item and be collision-free.
Every renderer returns an injective map item id -> identifier; the check is here, once, for all of them.

`IDENTIFIERS` is the one table of kinds: how to render them, whether they read a semantic-ID index, and how a
model card names them (rlrec.publish). A new kind is a renderer and a row here, plus its name in
`rlrec.schema.IDENTIFIER_KINDS` (the recipe schema imports no rlrec library); docs/architecture.md.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from rlrec.data.types import Catalog
from rlrec.errors import DataError
from rlrec.items.index import SemanticIndex


def title_identifiers(catalog: Catalog, counts: Counter, max_chars: int = 256) -> dict[str, str]:
    base = {}
    for item_id, item in catalog.items.items():
        title = " ".join(item.title.split())
        if not title:
            counts["empty_title"] += 1
            title = f"item {item_id}"
        if len(title) > max_chars:
            counts["title_cut_to_max_title_chars"] += 1
            title = title[:max_chars].rstrip()
        base[item_id] = title
    owners: dict[str, list[str]] = defaultdict(list)
    for item_id, title in base.items():
        owners[title].append(item_id)
    out = {}
    for item_id, title in base.items():
        if len(owners[title]) > 1:
            counts["duplicate_title"] += 1
            title = f"{title} [id {item_id}]"
        out[item_id] = title
    return out


def sid_identifiers(catalog: Catalog, index: dict[str, list[str]] | None, source: str) -> dict[str, str]:
    if index is None:
        raise DataError(
            "prompt.identifier 'sid' needs a semantic-ID index: the source has none; set source.index_path "
            "or build one with `rlrec items build`"
        )
    index = SemanticIndex.from_json(index, source).to_json()  # a malformed code fails naming the item
    missing = [item_id for item_id in catalog.items if item_id not in index]
    if missing:
        raise DataError(f"semantic-ID index misses {len(missing)} catalogue item(s), e.g. item {missing[0]}")
    return {item_id: "".join(index[item_id]) for item_id in catalog.items}


Renderer = Callable[[Catalog, "dict[str, list[str]] | None", Counter, str, int], "dict[str, str]"]


@dataclass(frozen=True)
class IdentifierKind:
    """One way to name items in text."""

    render: Renderer  # (catalog, semantic-ID index or None, notes counter, index source, max title chars) -> ids
    needs_index: bool  # reads a semantic-ID index (the data stage hands it the items stage's, publish copies it)
    tag: str  # the Hub tag of a published model
    description: str  # how a model card says what the model writes for an item


IDENTIFIERS: dict[str, IdentifierKind] = {
    "title": IdentifierKind(lambda catalog, index, counts, source, max_chars: title_identifiers(catalog, counts,
                                                                                               max_chars),
                            needs_index=False, tag="item-titles", description="its title"),
    "id": IdentifierKind(lambda catalog, index, counts, source, max_chars: {i: i for i in catalog.items},
                         needs_index=False, tag="item-ids", description="its item id"),
    "sid": IdentifierKind(lambda catalog, index, counts, source, max_chars: sid_identifiers(catalog, index, source),
                          needs_index=True, tag="semantic-ids",
                          description="a semantic ID (a short sequence of code tokens built from the item text)"),
}  # fmt: skip


def build_identifiers(
    kind: str, catalog: Catalog, index: dict[str, list[str]] | None, counts: Counter, source: str = "index.json",
    max_title_chars: int = 256,
) -> dict[str, str]:  # fmt: skip
    """Item id -> identifier string for the renderer `kind`; fails if two items would share one."""
    if kind not in IDENTIFIERS:
        raise DataError(f"unknown identifier {kind!r}; expected one of {', '.join(IDENTIFIERS)}")
    identifiers = IDENTIFIERS[kind].render(catalog, index, counts, source, max_title_chars)
    owners: dict[str, list[str]] = defaultdict(list)
    for item_id, text in identifiers.items():
        owners[text].append(item_id)
    shared = {text: ids for text, ids in owners.items() if len(ids) > 1}
    if shared:
        text, ids = next(iter(shared.items()))
        n_items = sum(len(ids) for ids in shared.values())
        raise DataError(
            f"{kind} identifiers collide: {n_items} items share {len(shared)} identifiers "
            f"(e.g. items {', '.join(ids[:3])} are all {text!r}); an identifier must name one item"
        )
    return identifiers
