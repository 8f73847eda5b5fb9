"""The catalogue trie: every item's completion tokens as a prefix tree.

Token sequences are the ones the model is trained on. In the chat prompt format (`ItemTrie.build`) they are the
tokens the chat template puts after the decoding prompt for an assistant turn holding the identifier, cut after
the template's stop token. The decoding prompt is the generation prompt plus whatever the template writes before
an answer (`answer_prefix_ids`: Qwen3's empty think block), so the trie starts at the identifier's first token
and a beam score is the log-probability of the identifier and its stop token only. This works for semantic IDs
(one added token per code) and for multi-token BPE or word-level titles alike. In the sequence prompt format
(`rlrec.decoding.inputs`) an item is followed by the next item, not by a stop token: its tokens alone name it, so
they must be prefix-free (`stop_token` None; fixed-length semantic IDs and one-token ids are).

Two views of the same tree:
- CSR tensors (`offsets`, `child_tokens`, `child_nodes`, `terminal_item`) for the batched beam search, which
  gathers the children of many nodes at once;
- `children` dicts for the `generate` logits processor, which walks one row at a time.
A node with no children is always terminal (an item is complete); reaching any other state is a bug or a
corrupted model input, and the decoders raise instead of falling back to free generation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from rlrec.errors import RlrecError

PROBE = "x"  # user content used to render the template around an identifier
MARK = "\x00rlrec-answer\x00"  # assistant content that no template and no tokenizer changes


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def answer_prefix_ids(tokenizer) -> list[int]:
    """Tokens the chat template writes between the generation prompt and an assistant turn's content.

    Qwen3's template ends the generation prompt at `<|im_start|>assistant\n` but writes an assistant turn as
    `<|im_start|>assistant\n<think>\n\n</think>\n\n{content}`; most templates write nothing there. Every decoding
    prompt ends with these tokens (`rlrec.decoding.beam.encode_prompts`), so the model decodes from exactly the
    context the training text has before each identifier: Qwen3's non-thinking mode (what `enable_thinking=False`
    renders), for thinking and non-thinking templates alike. A template whose generation prompt is not the start of
    its own assistant turn cannot be made to agree and is an error."""
    user = [{"role": "user", "content": PROBE}]
    prompt_text = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": MARK}], tokenize=False)
    if MARK not in full_text or not full_text.startswith(prompt_text):
        raise RlrecError(f"the chat template's generation prompt {prompt_text[-40:]!r} is not the start of its "
                         "assistant turn; training text and decoding prompt would differ: give the tokenizer a "
                         "template whose generation prompt is a prefix of an assistant turn")  # fmt: skip
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False)
    head = tokenizer(full_text[: full_text.index(MARK)], add_special_tokens=False)["input_ids"]
    if head[: len(prompt)] != prompt:
        raise RlrecError(f"the chat template's text before the answer ({full_text[len(prompt_text):][:40]!r}) "
                         "merges with the generation prompt's last tokens; decoding cannot start from the training "
                         "context")  # fmt: skip
    return head[len(prompt) :]


def completion_token_ids(tokenizer, contents: list[str]) -> list[list[int]]:
    """Tokens the chat template produces for assistant turns with these contents, after the decoding prompt
    (the generation prompt plus `answer_prefix_ids`): the identifier as the model sees it in context."""
    user = [{"role": "user", "content": PROBE}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False)
    prompt = prompt + answer_prefix_ids(tokenizer)
    full = tokenizer.apply_chat_template(
        [[*user, {"role": "assistant", "content": c}] for c in contents], tokenize=True, return_dict=False
    )
    for content, ids in zip(contents, full, strict=True):
        if ids[: len(prompt)] != prompt:
            merged = tokenizer.decode(prompt[_common_prefix(prompt, ids) :])
            raise RlrecError(f"identifier {content!r}: its first tokens merge with the template's text before the "
                             f"answer ({merged!r}); the decoding prompt would not be the training context; change "
                             "its first character")  # fmt: skip
    return [ids[len(prompt) :] for ids in full]


@dataclass
class ItemTrie:
    item_ids: list[str]  # item index -> catalogue item id
    sequences: list[list[int]]  # item index -> completion tokens, ending with the stop token when there is one
    stop_token: int | None  # None: items end where their (prefix-free) tokens end
    children: list[dict[int, int]]  # node -> {token: child node}
    terminal: dict[int, int]  # node -> item index, for nodes where an item is complete
    offsets: torch.Tensor  # [n_nodes + 1] CSR row pointers
    child_tokens: torch.Tensor  # [n_edges]
    child_nodes: torch.Tensor  # [n_edges]
    terminal_item: torch.Tensor  # [n_nodes], -1 where no item ends

    @classmethod
    def from_sequences(cls, item_ids: list[str], sequences: list[list[int]], stop_token: int | None) -> ItemTrie:
        children: list[dict[int, int]] = [{}]
        terminal: dict[int, int] = {}
        for index, sequence in enumerate(sequences):
            if not sequence:
                raise RlrecError(f"item {item_ids[index]}: empty token sequence")
            if stop_token is not None and (sequence[-1] != stop_token or stop_token in sequence[:-1]):
                raise RlrecError(f"item {item_ids[index]}: token sequence {sequence} must end with the stop token")
            node = 0
            for token in sequence:
                if token not in children[node]:
                    children[node][token] = len(children)
                    children.append({})
                node = children[node][token]
            if node in terminal:
                other = item_ids[terminal[node]]
                raise RlrecError(f"items {other} and {item_ids[index]} tokenize identically; identifiers must differ")
            terminal[node] = index
        if stop_token is None:
            prefixes = [node for node in terminal if children[node]]
            if prefixes:
                first = item_ids[terminal[prefixes[0]]]
                raise RlrecError(f"{len(prefixes)} item(s) tokenize to a prefix of another item's tokens (e.g. item "
                                 f"{first}); without a stop token between items the identifiers must be prefix-free: "
                                 "use semantic IDs, or a separator that tokenizes to its own token")  # fmt: skip
        offsets, tokens, nodes = [0], [], []
        for node_children in children:
            for token, child in sorted(node_children.items()):
                tokens.append(token)
                nodes.append(child)
            offsets.append(len(tokens))
        terminal_item = torch.full((len(children),), -1, dtype=torch.long)
        for node, index in terminal.items():
            terminal_item[node] = index
        return cls(
            list(item_ids), [list(s) for s in sequences], stop_token, children, terminal,
            torch.tensor(offsets), torch.tensor(tokens, dtype=torch.long), torch.tensor(nodes, dtype=torch.long),
            terminal_item,
        )  # fmt: skip

    @classmethod
    def build(cls, tokenizer, identifiers: Mapping[str, str]) -> ItemTrie:
        """Tokenise every item's identifier as the model sees it after the generation prompt. The item ends at the
        first special token the template puts after the content (`<eos>`, `<|im_end|>`, `<|eot_id|>`), which is
        the token generation stops on; a template that appends none gets the eos token."""
        # unk is excluded: a word-level tokenizer writes it inside an identifier's content. Padding is not: SmolLM2
        # and many Llama-family tokenizers pad with their eos (`<|im_end|>`), the very token that ends an item.
        specials = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
        item_ids, sequences, stops = list(identifiers), [], set()
        for item, ids in zip(item_ids, completion_token_ids(tokenizer, list(identifiers.values())), strict=True):
            cut = next((i for i, token in enumerate(ids) if token in specials), None)
            sequence = ids[: cut + 1] if cut is not None else [*ids, tokenizer.eos_token_id]
            if sequence[-1] is None:
                raise RlrecError("the tokenizer has no eos token and its chat template appends no special token")
            if len(sequence) < 2:
                raise RlrecError(f"item {item}: identifier {identifiers[item]!r} tokenizes to nothing")
            stops.add(sequence[-1])
            sequences.append(sequence)
        if len(stops) != 1:
            raise RlrecError(f"the chat template ends items with different tokens {sorted(stops)}; expected one")
        return cls.from_sequences(item_ids, sequences, stops.pop())

    @property
    def max_length(self) -> int:
        return max(len(s) for s in self.sequences)

    def walk(self, tokens: list[int]) -> int:
        """The node reached from the root by `tokens`; a token the trie does not allow raises."""
        node = 0
        for position, token in enumerate(tokens):
            child = self.children[node].get(token)
            if child is None:
                raise RlrecError(
                    f"decoding left the catalogue: token {token} at position {position} is not allowed after "
                    f"{tokens[:position]} (allowed: {sorted(self.children[node])[:10]}...)"
                )
            node = child
        return node

    def gather_children(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a batch of nodes: (child tokens [n, m], child nodes [n, m], valid mask [n, m]), m = max fan-out."""
        starts = self.offsets[nodes]
        counts = self.offsets[nodes + 1] - starts
        width = max(int(counts.max()), 1)
        steps = torch.arange(width)
        valid = steps.unsqueeze(0) < counts.unsqueeze(1)
        index = (starts.unsqueeze(1) + steps.unsqueeze(0)).clamp(max=max(len(self.child_tokens) - 1, 0))
        return self.child_tokens[index], self.child_nodes[index], valid
