"""Constrained decoding over the catalogue: the item trie, our batched beam search (`recommend`), a logits
processor for `generate`, and a regular expression of all identifiers (`regex`: for vLLM structured outputs; no
rlrec path uses it yet, a vLLM rollout would)."""

from rlrec.decoding.beam import recommend
from rlrec.decoding.processor import TrieLogitsProcessor, items_from_generations, sample_items
from rlrec.decoding.trie import ItemTrie

__all__ = ["ItemTrie", "TrieLogitsProcessor", "items_from_generations", "recommend", "sample_items"]
