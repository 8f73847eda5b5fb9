"""Semantic-ID tokens in a tokenizer and a model: add one token per code, resize the embeddings, expose the ids.

Each code (`<a_12>`) becomes one added token (not normalised, no stripping), so an identifier encodes to exactly
its L code tokens whatever the base tokenizer. The new rows of the embedding matrix (and of an untied output
head) are initialised by `resize_token_embeddings`' mean resizing; their ids are returned so that the training
stages can make exactly these rows trainable under LoRA.
"""

from __future__ import annotations

from collections.abc import Mapping

from tokenizers import AddedToken

from rlrec.errors import RlrecError
from rlrec.items.index import parse_sid


def add_code_tokens(tokenizer, tokens: list[str]) -> list[int]:
    """Add the code tokens (those not already in the vocabulary); return the id of every token in `tokens`."""
    vocab = tokenizer.get_vocab()
    new = [AddedToken(t, normalized=False, special=False, lstrip=False, rstrip=False) for t in tokens if t not in vocab]
    if new:
        tokenizer.add_tokens(new)
    return tokenizer.convert_tokens_to_ids(tokens)


def resize_model(model, tokenizer) -> None:
    """Grow the input embeddings (and a separate output head) to the tokenizer's size."""
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)


def check_round_trip(tokenizer, identifiers: Mapping[str, str]) -> None:
    """Every identifier must encode to one token per code and decode back to the same item."""
    owner = {text: item for item, text in identifiers.items()}
    for item, text in identifiers.items():
        ids = tokenizer.encode(text, add_special_tokens=False)
        tokens = tokenizer.convert_ids_to_tokens(ids)
        back = parse_sid(tokenizer.decode(ids, skip_special_tokens=False))
        if "".join(tokens) != text or owner.get(back) != item:
            raise RlrecError(f"item {item}: identifier {text!r} encodes to {tokens} and decodes to {back!r}")
