"""Semantic-ID indexes: the LC-Rec / MiniOneRec `index.json` format, statistics, and collision resolution.

Format: `{item_id: ["<a_12>", "<b_3>", "<c_200>"]}`: one code token per level, the level's letter then the code.

Collisions (two items with the same codes) make an identifier ambiguous: a generated identifier cannot name one
item, so decoding and evaluation break. Published indexes tolerate them (`rqvae_native` on Scientific: 887
colliding items); ours never do. Two resolutions, both keep one item per identifier:
- `reassign` (default, length unchanged): in each colliding group the first item keeps its codes; every other
  item moves to the nearest free code of the last level under the same prefix (nearest by the quantiser's
  distances when the index was built here; in code order for a loaded index). Fails if a prefix is full.
- `append_level` (TIGER): every identifier gets one more level, the item's rank inside its colliding group
  (0 for items that did not collide), so identifiers stay of equal length.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlrec.data.io import load_json
from rlrec.errors import DataError, RlrecError

CODE = re.compile(r"^<([a-z]+)_(\d+)>$")
CODE_IN_TEXT = re.compile(r"<[a-z]+_\d+>")


def letters(levels: int) -> list[str]:
    return list(string.ascii_lowercase[:levels])


@dataclass
class SemanticIndex:
    item_ids: list[str]
    codes: np.ndarray  # [n_items, levels] int64
    level_names: list[str]  # the letter of each level

    # ---------------------------------------------------------------- construction and format

    @classmethod
    def from_codes(cls, item_ids: list[str], codes: np.ndarray) -> SemanticIndex:
        return cls(list(item_ids), np.asarray(codes, dtype=np.int64), letters(codes.shape[1]))

    @classmethod
    def from_json(cls, mapping: Mapping, source: str) -> SemanticIndex:
        """Parse `{item: [code, ...]}`; a malformed code or an inconsistent length fails naming the item."""
        if not isinstance(mapping, Mapping) or not mapping:
            raise DataError(f"{source}: expected a non-empty object {{item_id: [code, ...]}}")
        item_ids, rows, names = [], [], None
        for item_id, codes in mapping.items():
            if not isinstance(codes, list) or not codes:
                raise DataError(f"{source} [item {item_id}]: expected a non-empty list of codes, got {codes!r}")
            parsed = [CODE.match(c) if isinstance(c, str) else None for c in codes]
            if not all(parsed):
                bad = codes[[m is None for m in parsed].index(True)]
                raise DataError(f"{source} [item {item_id}]: malformed code {bad!r}; expected '<a_12>'")
            item_names = [m.group(1) for m in parsed]
            if names is None:
                names = item_names
            elif item_names != names:
                raise DataError(f"{source} [item {item_id}]: levels {item_names} differ from the first item's {names}")
            item_ids.append(str(item_id))
            rows.append([int(m.group(2)) for m in parsed])
        return cls(item_ids, np.array(rows, dtype=np.int64), names)

    def to_json(self) -> dict[str, list[str]]:
        return {item: self.code_tokens(row) for item, row in zip(self.item_ids, self.codes, strict=True)}

    def code_tokens(self, row: Iterable[int]) -> list[str]:
        return [f"<{name}_{int(code)}>" for name, code in zip(self.level_names, row, strict=True)]

    def identifiers(self) -> dict[str, str]:
        return {item: "".join(tokens) for item, tokens in self.to_json().items()}

    def vocabulary(self) -> list[str]:
        """Every code token in use, level by level, in code order: the tokens to add to a tokenizer."""
        return [
            f"<{name}_{code}>"
            for level, name in enumerate(self.level_names)
            for code in sorted(set(self.codes[:, level].tolist()))
        ]

    def align(self, catalog_ids: Iterable[str], source: str) -> SemanticIndex:
        """Reorder to the catalogue; an item missing from the index or not in the catalogue fails, named."""
        position = {item: i for i, item in enumerate(self.item_ids)}
        catalog_ids = list(catalog_ids)
        missing = [item for item in catalog_ids if item not in position]
        if missing:
            raise DataError(f"{source}: misses {len(missing)} catalogue item(s), e.g. item {missing[0]}")
        extra = sorted(set(position) - set(catalog_ids))
        if extra:
            raise DataError(
                f"{source}: has {len(extra)} item(s) that are not in the catalogue, e.g. item {extra[0]} "
                "(an index built for another version of the data?)"
            )
        order = [position[item] for item in catalog_ids]
        return SemanticIndex(catalog_ids, self.codes[order], self.level_names)


def read_index(path: str | Path) -> dict[str, list[str]]:
    """Read and validate a semantic-ID index file (a malformed code fails naming the item)."""
    return SemanticIndex.from_json(load_json(Path(path)), str(path)).to_json()


def identifier_codes(identifiers: Mapping[str, str]) -> list[str]:
    """Every code token the identifiers use, sorted (none for titles and ids): the tokens a tokenizer must add."""
    return sorted({code for text in identifiers.values() for code in CODE_IN_TEXT.findall(text)})


def parse_sid(text: str) -> str:
    """Read an identifier back from decoded text: tokenizers may put spaces between added tokens."""
    return "".join(CODE_IN_TEXT.findall(text))


# -------------------------------------------------------------------- statistics


def collision_stats(codes: np.ndarray) -> dict:
    groups: dict[tuple, int] = defaultdict(int)
    for row in map(tuple, codes.tolist()):
        groups[row] += 1
    shared = [n for n in groups.values() if n > 1]
    return {
        "distinct_identifiers": len(groups),
        "colliding_items": sum(shared),
        "shared_identifiers": len(shared),
        "max_items_per_identifier": max(groups.values()),
    }


def index_stats(index: SemanticIndex, sizes: list[int] | None) -> dict:
    """Codebook utilisation per level and prefix sharing. `sizes` are the codebook sizes where known; for a
    loaded index the size of a level is inferred as its largest code + 1."""
    codes, n = index.codes, len(index.item_ids)
    utilisation = []
    for level, name in enumerate(index.level_names):
        size = sizes[level] if sizes and level < len(sizes) else int(codes[:, level].max()) + 1
        used = len(set(codes[:, level].tolist()))
        utilisation.append({"level": name, "codes_used": used, "codebook_size": size, "share": round(used / size, 4)})
    prefixes = []
    for depth in range(1, codes.shape[1]):
        counts: dict[tuple, int] = defaultdict(int)
        for row in map(tuple, codes[:, :depth].tolist()):
            counts[row] += 1
        prefixes.append({
            "depth": depth,
            "distinct_prefixes": len(counts),
            "mean_items_per_prefix": round(n / len(counts), 3),
            "max_items_per_prefix": max(counts.values()),
        })  # fmt: skip
    return {"num_items": n, "levels": len(index.level_names), "utilisation": utilisation, "prefix_sharing": prefixes}


# -------------------------------------------------------------------- collision resolution


def _groups(codes: np.ndarray) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, row in enumerate(map(tuple, codes.tolist())):
        groups[row].append(i)
    return groups


def reassign(codes: np.ndarray, last_size: int, preferences: np.ndarray | None) -> tuple[np.ndarray, int]:
    """Move every colliding item but the first of its group to the nearest free last-level code."""
    codes = codes.copy()
    groups = _groups(codes)
    used = set(groups)
    moved = 0
    for row, members in groups.items():
        for i in members[1:]:
            candidates = preferences[i] if preferences is not None else range(last_size)
            free = next((int(c) for c in candidates if (*row[:-1], int(c)) not in used), None)
            if free is None:
                raise RlrecError(
                    f"cannot reassign item {i}: all {last_size} last-level codes under prefix {row[:-1]} are taken; "
                    "use items.collision: append_level or a larger last codebook"
                )
            codes[i, -1] = free
            used.add((*row[:-1], free))
            moved += 1
    return codes, moved


def append_level(codes: np.ndarray) -> tuple[np.ndarray, int]:
    """Add a level holding each item's rank inside its colliding group (0 when it did not collide)."""
    extra = np.zeros((len(codes), 1), dtype=np.int64)
    changed = 0
    for members in _groups(codes).values():
        for rank, i in enumerate(members):
            extra[i, 0] = rank
            changed += rank > 0
    return np.concatenate([codes, extra], axis=1), changed


def resolve_collisions(
    index: SemanticIndex, method: str, last_size: int | None = None, preferences: np.ndarray | None = None
) -> tuple[SemanticIndex, int]:
    """Return a collision-free index and the number of items whose codes changed."""
    if method == "append_level":
        codes, changed = append_level(index.codes)
        names = [*index.level_names, string.ascii_lowercase[len(index.level_names)]]
    else:
        size = last_size or int(index.codes[:, -1].max()) + 1
        codes, changed = reassign(index.codes, size, preferences)
        names = index.level_names
    if collision_stats(codes)["colliding_items"]:  # the guarantee, checked every time (not an assert: -O)
        raise RuntimeError("collision resolution left a collision; this is a bug in rlrec")
    return SemanticIndex(index.item_ids, codes, names), changed
