"""Trie-constrained `generate`: a logits processor for greedy, sampling and beam search, batched.

The state of each row comes from the tokens generated after the prompt (`input_ids[:, prompt_length:]`), never
from matching the prompt's text: MiniOneRec's processor keys on the last prompt tokens, which breaks as soon as a
chat template changes what precedes the answer. A row whose generated tokens leave the trie, or a state with no
allowed continuation, raises; the mask is never silently skipped (MiniOneRec's processor falls back to free
generation when its lookup is empty). A row that has finished its item (reached a terminal node: after the stop
token, or after the last token of a prefix-free identifier) may only emit padding or the stop token.

Our batched `beam_search` is the fast path for top-K; this processor serves sampling (GRPO rollouts,
`sample_items`) and users of `generate`.

`sample_items` samples under a blank generation config: an Instruct model's `generation_config.json` (Qwen2.5-Instruct
ships temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05) would otherwise fill every setting the call
leaves unset, so the rollouts would come from another distribution than the one the policy's log-probabilities
are computed from, without a word (MiniOneRec's issue #49 is that class of bug).
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessor

from rlrec.decoding.trie import ItemTrie
from rlrec.errors import RlrecError


class TrieLogitsProcessor(LogitsProcessor):
    def __init__(self, trie: ItemTrie, prompt_length: int, pad_token_id: int | None) -> None:
        self.trie = trie
        self.prompt_length = prompt_length
        self.after_stop = sorted({t for t in (trie.stop_token, pad_token_id) if t is not None})
        self._nodes: dict[tuple[int, ...], int | None] = {(): 0}  # generated prefix -> trie node

    def node(self, generated: tuple[int, ...]) -> int | None:
        """Trie node for a generated prefix; None for the padding after a complete item."""
        if generated not in self._nodes:
            parent = self.node(generated[:-1])
            if parent is None or parent in self.trie.terminal:
                self._nodes[generated] = None
            else:
                child = self.trie.children[parent].get(generated[-1])
                if child is None:
                    raise RlrecError(f"generation left the catalogue after tokens {list(generated)}")
                self._nodes[generated] = child
        return self._nodes[generated]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = torch.full_like(scores, float("-inf"))
        for row, ids in enumerate(input_ids[:, self.prompt_length :].tolist()):
            node = self.node(tuple(ids))
            done = node is None or node in self.trie.terminal
            allowed = self.after_stop if done else list(self.trie.children[node])
            if not allowed:
                raise RlrecError(f"constrained decoding reached a dead end after tokens {ids}")
            mask[row, allowed] = 0.0
        return scores + mask


def items_from_generations(trie: ItemTrie, sequences: torch.Tensor, prompt_length: int) -> list[str]:
    """Map generated sequences (prompt included) to catalogue item ids; an incomplete item raises."""
    items = []
    for ids in sequences[:, prompt_length:].tolist():
        node, length = 0, 0
        while node not in trie.terminal and length < len(ids):
            length += 1
            node = trie.walk(ids[:length])  # raises if the tokens left the catalogue
        if node not in trie.terminal:
            raise RlrecError(f"generation stopped before completing an item: {ids}")
        items.append(trie.item_ids[trie.terminal[node]])
    return items


@torch.no_grad()
def sample_items(
    model, trie: ItemTrie, input_ids: torch.Tensor, attention_mask: torch.Tensor, samples: int, temperature: float,
    pad_token_id: int,
) -> list[str]:  # fmt: skip
    """`samples` constrained samples per prompt at `temperature` from the model's own distribution (no top-k, top-p
    or repetition penalty from the model's generation config): the sampled item ids, prompt by prompt."""
    processor = TrieLogitsProcessor(trie, input_ids.shape[1], pad_token_id)
    saved, model.generation_config = model.generation_config, GenerationConfig()
    try:
        sequences = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=temperature, top_k=0,
            top_p=1.0, num_return_sequences=samples, max_new_tokens=trie.max_length, logits_processor=[processor],
            pad_token_id=pad_token_id, eos_token_id=trie.stop_token,
        )  # fmt: skip
    finally:
        model.generation_config = saved
    return items_from_generations(trie, sequences.cpu(), input_ids.shape[1])
