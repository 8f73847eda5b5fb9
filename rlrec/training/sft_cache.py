"""The SFT stage's tokenised training rows, cached by content hash.

TRL's `SFTTrainer` tokenises every row through the chat template when it is built: 2-5 minutes for the 131k rows
of a 22k-user dataset, on every run of the stage (a rerun, a resumed run, another learning rate). The rows TRL
prepared are saved once beside the prepared data, `runs/<name>/data/tokenised/<key>/` (an SFT stage rerun with
other settings clears its own folder, not the data's), and a later run whose key matches hands them to TRL as they
are (`dataset_kwargs.skip_prepare_dataset`).

The key hashes everything the prepared rows depend on: the raw training rows (content, in order), the tokenizer
(vocabulary, added tokens, chat template), `max_length`, the loss and packing settings, and the TRL version. A
folder is written whole and then renamed, by the main process only, so another process (or a run killed while
writing) never reads a partial one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import trl
from datasets import Dataset, load_from_disk

CACHE_DIR = "tokenised"


def cache_key(rows: Dataset, tokenizer, settings: dict) -> str:
    digest = hashlib.sha256(json.dumps({**settings, "trl": trl.__version__}, sort_keys=True).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    digest.update((tokenizer.chat_template or "").encode())
    for batch in rows.iter(batch_size=4096):
        digest.update(json.dumps(batch, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


def load_cached(data_dir: Path, key: str) -> Dataset | None:
    path = data_dir / CACHE_DIR / key
    if not path.is_dir():
        return None
    print(f"rlrec sft: tokenised rows from {path}", file=sys.stderr)
    return load_from_disk(str(path))


def save_cached(data_dir: Path, key: str, prepared: Dataset, main_process: bool) -> None:
    """Keep this key's rows only: a cache per past setting would grow without bound in a grid's run folder."""
    if not main_process:
        return
    folder = data_dir / CACHE_DIR
    partial = folder / f".{key}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    prepared.save_to_disk(str(partial))
    for old in folder.iterdir():
        if old.name != partial.name:
            shutil.rmtree(old, ignore_errors=True)
    os.replace(partial, folder / key)
    print(f"rlrec sft: tokenised rows cached in {folder / key}", file=sys.stderr)
