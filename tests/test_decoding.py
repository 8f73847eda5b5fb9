"""Constrained decoding on tiny random models (a random model is the hardest case for a constraint)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlrec.decoding import ItemTrie, TrieLogitsProcessor, beam, items_from_generations, recommend, sample_items
from rlrec.decoding.beam import encode_prompts, left_pad
from rlrec.errors import RlrecError
from rlrec.models import build_tokenizer, tiny_llama

SID = {str(i): f"<a_{i % 5}><b_{(i * 7) % 11}><c_{i}>" for i in range(40)}
TITLES = {"1": "Toy Story", "2": "Toy Story 2", "3": "Story of Toys", "4": "Heat", "5": "Heat Wave", "6": "Toy"}
PROMPTS = [
    [{"role": "user", "content": "The user interacted with these items in order: Heat, Toy. Next?"}],
    [{"role": "user", "content": "Items: <a_1><b_7><c_1>. Next?"}],
    [{"role": "user", "content": "Next?"}],
]


def setup(identifiers: dict[str, str], seed: int = 0, kv_heads: int | None = None):
    """Tokenizer, a tiny random Llama and the trie; `kv_heads` below the 4 attention heads: grouped-query attention
    (SmolLM2: 9 heads over 3 KV heads, Qwen3 likewise)."""
    texts = [m["content"] for p in PROMPTS for m in p] + list(identifiers.values())
    tokenizer = build_tokenizer(texts)
    if kv_heads is None:
        model = tiny_llama(tokenizer, hidden_size=32, layers=2, heads=2, seed=seed)
    else:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=kv_heads, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=True,
        ))  # fmt: skip
    # Sharper logits than the default init so that ranks are not near-ties.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1.0)
    return tokenizer, model, ItemTrie.build(tokenizer, identifiers)


@torch.no_grad()
def brute_force_logprobs(model, tokenizer, trie: ItemTrie, prompt) -> dict[str, float]:
    """log P(item | prompt) for every item by teacher forcing, one item at a time."""
    prompt_ids = encode_prompts(tokenizer, [prompt])[0]
    out = {}
    for item, sequence in zip(trie.item_ids, trie.sequences, strict=True):
        ids = torch.tensor([prompt_ids + sequence])
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        steps = range(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(sequence))
        out[item] = float(sum(logprobs[t, ids[0, t + 1]] for t in steps))
    return out


@pytest.mark.parametrize("kv_heads", [None, 2], ids=["multi-head", "grouped-query"])
@pytest.mark.parametrize("identifiers", [SID, TITLES], ids=["semantic-ids", "titles-with-prefixes"])
def test_exact_beam_equals_brute_force(identifiers, kv_heads):
    """With a beam as wide as the catalogue the search is exact: it must rank all items like teacher forcing."""
    tokenizer, model, trie = setup(identifiers, kv_heads=kv_heads)
    recs = recommend(model, tokenizer, PROMPTS, k=len(identifiers), trie=trie, batch_size=2)
    for prompt, rec in zip(PROMPTS, recs, strict=True):
        truth = brute_force_logprobs(model, tokenizer, trie, prompt)
        assert [item for item, _ in rec] == sorted(truth, key=truth.get, reverse=True)
        for item, score in rec:
            assert score == pytest.approx(truth[item], abs=1e-4)


@pytest.mark.parametrize("kv_heads", [None, 1], ids=["multi-head", "grouped-query"])
@pytest.mark.parametrize("identifiers", [SID, TITLES], ids=["semantic-ids", "titles-with-prefixes"])
def test_shared_prompt_steps_equal_repeated_prompt_steps(identifiers, kv_heads, monkeypatch):
    """The beam search's steps attend to each prompt's cache stored once and feed only the beams still inside an
    item; a model that cannot take that attention repeats the prompt's cache to every beam and feeds every beam.
    Both give the same items and scores, for prompts of different lengths (left padding) and identifiers of
    different lengths (beams finish at different steps)."""
    tokenizer, model, trie = setup(identifiers, kv_heads=kv_heads)
    used: list[bool] = []
    shared = beam.shared_prompt_attention

    @contextlib.contextmanager
    def recorded(*args, **kwargs):
        with shared(*args, **kwargs) as feed:
            used.append(feed is not None)
            yield feed

    @contextlib.contextmanager
    def unavailable(*args, **kwargs):
        yield None

    monkeypatch.setattr(beam, "shared_prompt_attention", recorded)
    fast = recommend(model, tokenizer, PROMPTS, k=3, trie=trie, beam_width=4, batch_size=3)
    assert used == [True] and model.config._attn_implementation == "sdpa"  # switched back after the search
    monkeypatch.setattr(beam, "shared_prompt_attention", unavailable)
    repeated = recommend(model, tokenizer, PROMPTS, k=3, trie=trie, beam_width=4, batch_size=3)
    for a, b in zip(fast, repeated, strict=True):
        assert [item for item, _ in a] == [item for item, _ in b]
        assert [score for _, score in a] == pytest.approx([score for _, score in b], abs=1e-5)


def test_items_end_at_eos_when_the_tokenizer_pads_with_it():
    """SmolLM2 and many Llama-family tokenizers pad with their eos (`<|im_end|>`): the trie still ends every item
    at that token (it used to skip the padding token and fail with "must end with the stop token")."""
    tokenizer, _, _ = setup(TITLES)
    tokenizer.pad_token = tokenizer.eos_token
    trie = ItemTrie.build(tokenizer, TITLES)
    assert trie.stop_token == tokenizer.eos_token_id
    assert all(s[-1] == trie.stop_token and trie.stop_token not in s[:-1] for s in trie.sequences)


def test_narrow_beam_returns_distinct_catalogue_items_and_agrees_with_generate():
    tokenizer, model, trie = setup(SID)
    recs = recommend(model, tokenizer, PROMPTS, k=5, trie=trie, beam_width=8)
    for prompt, rec in zip(PROMPTS, recs, strict=True):
        items = [item for item, _ in rec]
        assert len(items) == 5 == len(set(items)) and set(items) <= set(SID)
        scores = [s for _, s in rec]
        assert scores == sorted(scores, reverse=True)
        ids, mask = left_pad(encode_prompts(tokenizer, [prompt]), tokenizer.pad_token_id)
        out = model.generate(
            input_ids=ids, attention_mask=mask, num_beams=8, num_return_sequences=5, do_sample=False,
            max_new_tokens=trie.max_length, eos_token_id=trie.stop_token, pad_token_id=tokenizer.pad_token_id,
            logits_processor=[TrieLogitsProcessor(trie, ids.shape[1], tokenizer.pad_token_id)],
            length_penalty=0.0,
        )  # fmt: skip
        assert items_from_generations(trie, out, ids.shape[1]) == items


@pytest.mark.parametrize("identifiers", [SID, TITLES], ids=["semantic-ids", "titles-with-prefixes"])
def test_sampling_and_greedy_only_produce_catalogue_items(identifiers):
    tokenizer, model, trie = setup(identifiers, seed=3)
    ids, mask = left_pad(encode_prompts(tokenizer, PROMPTS), tokenizer.pad_token_id)
    processor = TrieLogitsProcessor(trie, ids.shape[1], tokenizer.pad_token_id)
    torch.manual_seed(0)
    sampled = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=True, temperature=2.0, top_k=0, num_return_sequences=30,
        max_new_tokens=trie.max_length, eos_token_id=trie.stop_token, pad_token_id=tokenizer.pad_token_id,
        logits_processor=[processor],
    )  # fmt: skip
    items = items_from_generations(trie, sampled, ids.shape[1])
    assert len(items) == 90 and set(items) <= set(identifiers) and len(set(items)) > 1
    greedy = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=trie.max_length,
        eos_token_id=trie.stop_token,
        pad_token_id=tokenizer.pad_token_id,
        logits_processor=[TrieLogitsProcessor(trie, ids.shape[1], tokenizer.pad_token_id)],
    )
    assert set(items_from_generations(trie, greedy, ids.shape[1])) <= set(identifiers)


def test_dead_end_raises_instead_of_generating_freely():
    tokenizer, _, trie = setup(SID)
    processor = TrieLogitsProcessor(trie, prompt_length=1, pad_token_id=tokenizer.pad_token_id)
    outside = tokenizer.convert_tokens_to_ids("Next")  # a word, never a code token
    with pytest.raises(RlrecError, match="left the catalogue"):
        processor(torch.tensor([[0, outside]]), torch.zeros(1, len(tokenizer)))
    with pytest.raises(RlrecError, match="left the catalogue"):
        trie.walk([outside])
    # A broken trie state (a node with no children that completes no item) also raises.
    trie.children.append({})
    processor._nodes[(99,)] = len(trie.children) - 1
    with pytest.raises(RlrecError, match="dead end"):
        processor(torch.tensor([[0, 99]]), torch.zeros(1, len(tokenizer)))


def test_exclude_history():
    tokenizer, model, trie = setup(SID)
    full = recommend(model, tokenizer, PROMPTS[:1], k=10, trie=trie)[0]
    banned = [item for item, _ in full[:3]]
    excluded = recommend(model, tokenizer, PROMPTS[:1], k=10, trie=trie, exclude=[banned])[0]
    assert not set(banned) & {item for item, _ in excluded}
    assert [i for i, _ in excluded[:7]] == [i for i, _ in full[3:10]]


def test_catalogue_smaller_than_beam():
    tokenizer, model, trie = setup(TITLES)
    rec = recommend(model, tokenizer, PROMPTS[:1], k=20, trie=trie)[0]
    assert sorted(item for item, _ in rec) == sorted(TITLES)


def test_sampled_rollouts_ignore_an_instruct_models_generation_config():
    """Qwen2.5-Instruct ships temperature 0.7, top_k 20, top_p 0.8, repetition_penalty 1.05; with a setting the
    rollout does not name (min_p 0.5 here) any such value would fill in. `sample_items` samples from the model's own
    constrained distribution: the frequencies of 400 samples match the teacher-forced probabilities, and the model's
    config is left as it was."""
    from transformers import GenerationConfig

    tokenizer, model, trie = setup(SID, seed=3)
    instruct = GenerationConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05,
                                min_p=0.5)  # fmt: skip
    model.generation_config = instruct
    ids, mask = left_pad(encode_prompts(tokenizer, PROMPTS[2:]), tokenizer.pad_token_id)
    torch.manual_seed(0)
    items = sample_items(model, trie, ids, mask, 400, 1.0, tokenizer.pad_token_id)
    assert model.generation_config is instruct
    assert set(items) <= set(SID) and len(set(items)) > 5

    prompt = ids[0].tolist()
    with torch.no_grad():  # the constrained distribution: each step's softmax over the trie's allowed tokens
        logits = model(torch.tensor([prompt + sequence for sequence in trie.sequences])).logits

    def probability(index: int) -> float:
        node, total = 0, 0.0
        for step, token in enumerate(trie.sequences[index]):
            allowed = sorted(trie.children[node])
            total += logits[index, len(prompt) - 1 + step, allowed].log_softmax(-1)[allowed.index(token)].item()
            node = trie.children[node][token]
        return float(torch.tensor(total).exp())

    exact = {item: probability(i) for i, item in enumerate(trie.item_ids)}
    assert sum(exact.values()) == pytest.approx(1.0, abs=1e-4)
    for item in sorted(exact, key=exact.get)[-3:]:  # the three likeliest items: within 4 standard errors
        assert abs(items.count(item) / len(items) - exact[item]) < 4 * (exact[item] * (1 - exact[item]) / 400) ** 0.5
