"""Models and tokenizers: load any causal LM, or build a small Llama plus a tokenizer offline.

No weights can be downloaded here, so tests, the demo and CPU benchmarks build a model from a config:
- `build_tokenizer(texts, extra_tokens)`: a `tokenizers` WordLevel tokenizer over the words of the prompts and
  identifiers, with every semantic-ID code as one added token, eos/pad/unk, and a chat template whose assistant
  turn is wrapped in `{% generation %}` (TRL's `assistant_only_loss` needs it);
- `tiny_llama(tokenizer, ...)`: a Llama-architecture `LlamaForCausalLM` from a config (Llama, not Qwen2: with a
  Qwen2 config `AutoTokenizer` silently ignores a custom tokenizer.json, see ../shared/notes/toolchain.md).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
CODE_TOKEN = re.compile(r"<[a-z]+_\d+>")


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])


def build_tokenizer(texts: Iterable[str], extra_tokens: Iterable[str] = (), min_count: int = 1):
    """A word-level tokenizer for `texts` (prompts and identifiers). Code tokens such as `<a_12>` found in the
    texts, and `extra_tokens`, become added tokens: one id each, matched before the words are split."""
    extra = list(dict.fromkeys(extra_tokens))
    words: Counter = Counter()
    pre = _pre_tokenizer()
    for text in texts:
        codes = CODE_TOKEN.findall(text)
        extra.extend(c for c in codes if c not in extra)
        words.update(w for w, _ in pre.pre_tokenize_str(CODE_TOKEN.sub(" ", text)))
    specials = [PAD, EOS, UNK, *ROLE_TOKENS]
    vocab = {token: i for i, token in enumerate(specials)}
    for word, count in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if count >= min_count and word not in vocab:
            vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in dict.fromkeys(extra)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK, chat_template=CHAT_TEMPLATE
    )
    tokenizer.padding_side = "left"  # generation pads on the left
    return tokenizer


def tiny_llama(
    tokenizer, hidden_size: int = 64, layers: int = 2, heads: int = 2, intermediate_size: int | None = None,
    max_position_embeddings: int = 1024, seed: int = 0,
) -> LlamaForCausalLM:  # fmt: skip
    """A from-scratch Llama sized to the tokenizer (tied input/output embeddings)."""
    import torch

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def load_model(path: str, device: str | None = None):
    """Load a trained model or LoRA adapter folder (or any hub id) with its tokenizer, for inference."""
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlrec.errors import RlrecError

    if os.path.sep in str(path) and not os.path.exists(path):
        raise RlrecError(f"model path not found: {path}")
    try:
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(path)
        else:
            model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise RlrecError(f"cannot load a model from {path}: {err}") from None
    if device is not None:
        model.to(device)
    return model, tokenizer
