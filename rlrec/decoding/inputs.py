"""The two ends of a generative recommender for one tokenizer: how a history becomes prompt token ids, and which
token sequence names each item (the catalogue trie). Training rows, evaluation, rollouts, preference pairs and
`rlrec.load` all go through `ModelInputs`, so the text a model is trained on and the prompt it decodes from agree
by construction.

Two prompt formats (`data.prompt.format`):

- `chat` (default): the history is rendered into the user turn of the chat template (`data.prompt.template`) and
  the answer is an assistant turn holding the next item's identifier, ended by the template's stop token
  (`<eos>`, `<|im_end|>`, ...). One training row per target.

      <|user|>History: <a_1><b_4><c_9> <a_7><b_2><c_5><|assistant|> [<a_3><b_3><c_1><eos>]

- `sequence`: the user turn holds the template without the history, and the history itself is the assistant
  turn: each item is its identifier's tokens, then the separator's own tokens (its visible part; for a
  whitespace separator, its token if the tokenizer has one: a BPE newline, which then ends every item as a stop
  token would; none for a word-level tokenizer). The next item is the continuation, so one row can train every item
  of a user's sequence at once (SASRec's signal per token, `sft.rows: sequence`), and its prefix is exactly the
  prompt that predicts each item. Item tokens must be prefix-free (no stop token follows an item): semantic IDs,
  one-token ids and newline-ended titles are.

      <|user|>History:<|assistant|> <a_1><b_4><c_9> <a_7><b_2><c_5> [<a_3><b_3><c_1>]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from rlrec.decoding.beam import encode_prompts
from rlrec.decoding.trie import ItemTrie, answer_prefix_ids
from rlrec.schema import PromptConfig


@dataclass
class ModelInputs:
    format: str  # chat | sequence
    trie: ItemTrie
    answer: list[int]  # what the chat template writes before an answer (`answer_prefix_ids`), ending every prompt
    prefix: list[int] = field(default_factory=list)  # sequence: the templated user turn and the assistant header
    blocks: dict[str, list[int]] = field(default_factory=dict)  # sequence: item id -> its tokens

    @classmethod
    def build(cls, tokenizer, identifiers: Mapping[str, str], prompt: PromptConfig) -> ModelInputs:
        answer = answer_prefix_ids(tokenizer)
        if prompt.format == "chat":
            return cls("chat", ItemTrie.build(tokenizer, identifiers), answer)
        # the separator's own tokens: its visible part (", " -> ","), or, for a whitespace separator, whatever the
        # tokenizer makes of it: a newline is a token of BPE tokenizers (it then ends every title, as a stop token
        # would), nothing for a word-level one
        separator = prompt.separator.strip() or prompt.separator
        tail = tokenizer.encode(separator, add_special_tokens=False)
        blocks = {item: tokenizer.encode(text, add_special_tokens=False) + tail for item, text in identifiers.items()}
        trie = ItemTrie.from_sequences(list(blocks), list(blocks.values()), stop_token=None)
        header = prompt.template.replace("{history}", "").strip()
        system = [{"role": "system", "content": prompt.system}] if prompt.system else []
        prefix = encode_prompts(tokenizer, [[*system, {"role": "user", "content": header}]], answer)[0]
        return cls("sequence", trie, answer, prefix, blocks)

    def history_ids(self, history: Sequence[str]) -> list[int]:
        """Sequence format: the prompt that predicts the item after `history`."""
        return self.prefix + [token for item in history for token in self.blocks[item]]

    def prompt_ids(self, tokenizer, rows) -> list[list[int]]:
        """Prompt token ids for rows with `prompt` (chat messages) and `history` (item ids) columns."""
        if self.format == "chat":
            return encode_prompts(tokenizer, rows["prompt"], self.answer)
        return [self.history_ids(history) for history in rows["history"]]
