"""Constrained decoding over the catalogue: the item trie, our batched beam search (`recommend`) and a logits
processor for `generate` (sampled GRPO rollouts)."""

from rlrec.decoding.beam import recommend
from rlrec.decoding.processor import TrieLogitsProcessor, items_from_generations, sample_items
from rlrec.decoding.trie import ItemTrie

__all__ = ["ItemTrie", "TrieLogitsProcessor", "items_from_generations", "recommend", "sample_items"]
