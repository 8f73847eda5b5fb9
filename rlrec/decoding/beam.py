"""Constrained top-K: our own batched beam search over the catalogue trie, and `recommend`.

Why not `generate(num_beams=W)`: it prefills the prompt once per beam and runs its search logic over the whole
vocabulary. Here each prompt is prefilled once and every step scores only the trie children of each beam, so the
cost is the forward passes:

    prefill(prompt) -> log p(t_1 | prompt);   beams = top-W root children
    for each further token: one forward of the last tokens of the beams still inside an item (single-token steps),
        candidates = beam score + log p(child | beam) over the trie children of each beam,
        finished beams (an item is complete) compete with their score unchanged and are fed no more,
        keep the top-W candidates per prompt, reorder the steps' cache to their parents.

The steps attend to the prompt's keys and values stored once per prompt (`rlrec.upstream.shared_prompt_attention`)
and to a cache of the generated tokens only: repeating a 158-token prompt's cache to 20 beams, and concatenating
it again at every step, was 53% of the CPU time of a SmolLM2 top-20 and 2.8 GB for 16 prompts. A model that
attention cannot serve gets the prompt's cache repeated to every beam and every beam fed (the same results).
log p is exact: the normaliser spans the whole vocabulary (`_child_logprobs`), only the allowed tokens are read.

The score of an item is log P(identifier tokens + stop token | prompt): the model's probability of recommending
exactly that item, with no length normalisation, so fixed-length semantic IDs and variable-length titles are
ranked by the same rule. Every returned item is a distinct catalogue item (trie paths are unique).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from rlrec.decoding.trie import ItemTrie, answer_prefix_ids
from rlrec.errors import RlrecError
from rlrec.upstream import reorder_generated_cache, shared_prompt_attention

NEG_INF = float("-inf")


def _select(scores: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`width` along the last dim, padded with -inf (index 0) when there are fewer candidates."""
    k = min(width, scores.shape[-1])
    top, index = scores.topk(k, dim=-1)
    if k < width:
        pad = width - k
        top = torch.cat([top, top.new_full((*top.shape[:-1], pad), NEG_INF)], dim=-1)
        index = torch.cat([index, index.new_zeros((*index.shape[:-1], pad))], dim=-1)
    return top, index


def _banned_mask(
    child_nodes: torch.Tensor, trie: ItemTrie, banned: torch.Tensor | None, rows: torch.Tensor
) -> torch.Tensor | None:
    """True where a child completes an item banned for that row's prompt (exclude_history)."""
    if banned is None:
        return None
    item = trie.terminal_item[child_nodes]
    hit = banned[rows.unsqueeze(-1).expand_as(item), item.clamp(min=0)]
    return hit & (item >= 0)


def _child_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) of the given tokens of each row. The normaliser is taken over the whole vocabulary (exact
    log-probabilities, equal to a teacher-forced forward's) without writing a [rows, vocabulary] log-softmax."""
    logits = logits.float()
    return logits.gather(1, tokens) - torch.logsumexp(logits, dim=-1, keepdim=True)


class _SharedPromptSteps:
    """Steps that feed only the beams still inside an item: the prompt's cache stays once per prompt (read by
    `shared_prompt_attention`), the steps' cache holds the generated tokens of the fed beams and follows their
    children (a finished beam needs no more forwards: it only competes with its score)."""

    def __init__(self, model, feed, width: int) -> None:
        self.model, self.feed_rows, self.width = model, feed, width
        self.cache, self.fed, self.parents = DynamicCache(), None, None

    def rows(self, live: torch.Tensor) -> torch.Tensor:
        rows = live.nonzero().squeeze(1)
        if self.fed is not None:  # each live beam continues the cache row of its parent, fed last step
            where = torch.full((live.numel(),), -1, dtype=torch.long)
            where[self.fed] = torch.arange(len(self.fed))
            self.cache.reorder_cache(where[self.parents[rows]].to(next(self.model.parameters()).device))
        self.fed = rows
        return rows

    def logits(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.feed_rows(self.fed.to(tokens.device))
        return self.model(input_ids=tokens.unsqueeze(1), position_ids=positions.unsqueeze(1),
                          past_key_values=self.cache, use_cache=True).logits[:, -1]  # fmt: skip

    def reorder(self, parents: torch.Tensor) -> None:
        self.parents = parents


class _RepeatedPromptSteps:
    """Steps for a model `shared_prompt_attention` cannot serve: the prompt's cache repeated to every beam, every
    beam fed every step, only the generated positions reordered (`reorder_generated_cache`)."""

    def __init__(self, model, cache, attention_mask: torch.Tensor, width: int) -> None:
        cache.batch_repeat_interleave(width)
        self.model, self.cache, self.step = model, cache, 0
        self.mask = attention_mask.repeat_interleave(width, dim=0)

    def rows(self, live: torch.Tensor) -> torch.Tensor:
        return torch.arange(live.numel())

    def logits(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.mask), 1))], dim=1)
        self.step += 1
        return self.model(input_ids=tokens.unsqueeze(1), attention_mask=self.mask, position_ids=positions.unsqueeze(1),
                          past_key_values=self.cache, use_cache=True).logits[:, -1]  # fmt: skip

    def reorder(self, parents: torch.Tensor) -> None:
        reorder_generated_cache(self.cache, parents.to(self.mask.device), self.step)


@torch.no_grad()
def beam_search(
    model, trie: ItemTrie, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int,
    banned: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Return (item indices [B, W], scores [B, W]) sorted by score; index -1 where fewer than W items exist.
    `banned` [B, n_items] bool excludes items per prompt (e.g. its history)."""
    device = input_ids.device
    batch = input_ids.shape[0]
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)  # fmt: skip
    root = torch.zeros(batch, dtype=torch.long)
    tokens, nodes, valid = trie.gather_children(root)
    cand = _child_logprobs(out.logits[:, -1], tokens.to(device)).cpu().masked_fill(~valid, NEG_INF)
    mask = _banned_mask(nodes, trie, banned, torch.arange(batch))
    if mask is not None:
        cand = cand.masked_fill(mask, NEG_INF)
    scores, pick = _select(cand, width)  # [B, W]
    beam_tokens, beam_nodes = tokens.gather(1, pick), nodes.gather(1, pick)
    next_position = positions[:, -1].repeat_interleave(width) + 1  # [B*W]
    with shared_prompt_attention(model, out.past_key_values, attention_mask, width) as feed:
        if feed is not None:
            steps = _SharedPromptSteps(model, feed, width)
        else:
            steps = _RepeatedPromptSteps(model, out.past_key_values, attention_mask, width)
        beam_nodes, scores = _expand(steps, trie, next_position, banned, beam_tokens, beam_nodes, scores)
    items = trie.terminal_item[beam_nodes]
    if bool(((items < 0) & ~torch.isinf(scores)).any()):
        raise RlrecError("beam search ended with an unfinished item; the trie and the model disagree")
    return items.masked_fill(torch.isinf(scores), -1), scores


def _expand(steps, trie: ItemTrie, next_position, banned, beam_tokens, beam_nodes, scores):
    """The single-token steps of `beam_search` after the prompt; returns the final (beam nodes, scores)."""
    batch, width = scores.shape
    device = next_position.device
    flat_rows = torch.arange(batch).repeat_interleave(width)  # prompt of each flat beam
    for _ in range(trie.max_length):
        live = (trie.terminal_item[beam_nodes] < 0) & ~torch.isinf(scores)  # beams inside an item
        if not bool(live.any()):
            break
        fed = steps.rows(live.reshape(-1))
        logits = steps.logits(beam_tokens.reshape(-1)[fed].to(device), next_position[fed.to(device)])
        next_position = next_position + 1
        tokens, nodes, valid = trie.gather_children(beam_nodes.reshape(-1)[fed])  # a finished beam has none
        flat_scores = scores.reshape(-1, 1)
        fed_cand = (flat_scores[fed] + _child_logprobs(logits, tokens.to(device)).cpu()).masked_fill(~valid, NEG_INF)
        cand = fed_cand.new_full((batch * width, fed_cand.shape[1]), NEG_INF)
        cand[fed] = fed_cand
        child_tokens, child_nodes = tokens.new_zeros(cand.shape), nodes.new_zeros(cand.shape)
        child_tokens[fed], child_nodes[fed] = tokens, nodes
        mask = _banned_mask(child_nodes, trie, banned, flat_rows)
        if mask is not None:
            cand = cand.masked_fill(mask, NEG_INF)
        # A finished beam stays as it is: one extra candidate column holding its own score.
        stay = flat_scores.masked_fill(live.reshape(-1, 1), NEG_INF)
        cand = torch.cat([cand, stay], dim=1)
        child_tokens = torch.cat([child_tokens, beam_tokens.reshape(-1, 1)], dim=1)
        child_nodes = torch.cat([child_nodes, beam_nodes.reshape(-1, 1)], dim=1)
        fan = cand.shape[1]
        scores, pick = _select(cand.reshape(batch, width * fan), width)
        parents = (torch.arange(batch).unsqueeze(1) * width + pick // fan).reshape(-1)
        flat_pick = parents.reshape(batch, width) * fan + pick % fan
        beam_tokens = child_tokens.reshape(-1)[flat_pick]
        beam_nodes = child_nodes.reshape(-1)[flat_pick]
        steps.reorder(parents)
    return beam_nodes, scores


def encode_prompts(tokenizer, prompts: Sequence, answer: list[int] | None = None) -> list[list[int]]:
    """Chat-message prompts (or plain strings, taken as one user turn) -> token ids with the generation prompt and
    the tokens the template writes before an answer (`answer`, derived by `answer_prefix_ids` when not given:
    `ModelInputs` derives them once per run). Prompts that are token ids already (`rlrec.decoding.inputs`, the
    sequence format) are used as they are."""
    if prompts and all(isinstance(p, list) and p and isinstance(p[0], int) for p in prompts):
        return [list(p) for p in prompts]
    conversations = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
    encoded = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=False)
    if answer is None:  # e.g. Qwen3's empty think block: the training text has it too
        answer = answer_prefix_ids(tokenizer)
    return [ids + answer for ids in encoded]


def padding_id(tokenizer, trie: ItemTrie) -> int:
    """The token that left-pads prompts: the tokenizer's pad token, or the trie's stop token when it has none
    (padding is masked out; any id the model knows would do)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else trie.stop_token


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


@torch.no_grad()
def recommend(
    model, tokenizer, prompts: Sequence, k: int, trie: ItemTrie, beam_width: int | None = None,
    batch_size: int = 16, exclude: Sequence[Sequence[str]] | None = None, progress: bool = False,
) -> list[list[tuple[str, float]]]:  # fmt: skip
    """Top-`k` distinct catalogue items per prompt with their log-probabilities, best first. `prompts` are chat
    messages, or token ids (`rlrec.decoding.inputs.ModelInputs.prompt_ids`).

    `beam_width` >= k (default k); `exclude[i]` lists item ids never to recommend for prompt i (its history when
    the protocol says `exclude_history`). `k` and the beam width are capped at the catalogue size: no list can hold
    more distinct items (fewer come back when history items are excluded), and a wider beam only allocates.
    Prompts are batched by length to limit padding."""
    from tqdm.auto import tqdm

    if k < 1:
        raise RlrecError("k must be >= 1")
    k = min(k, len(trie.item_ids))
    width = min(max(beam_width or k, k), len(trie.item_ids))
    model.eval()
    device = next(model.parameters()).device
    encoded = encode_prompts(tokenizer, prompts)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    position = {item: i for i, item in enumerate(trie.item_ids)}
    pad_id = padding_id(tokenizer, trie)
    results: list[list[tuple[str, float]]] = [[] for _ in encoded]
    for start in tqdm(range(0, len(order), batch_size), desc="recommend", disable=not progress, unit="batch"):
        chunk = order[start : start + batch_size]
        ids, mask = left_pad([encoded[i] for i in chunk], pad_id)
        banned = None
        if exclude is not None:
            banned = torch.zeros((len(chunk), len(trie.item_ids)), dtype=torch.bool)
            for row, i in enumerate(chunk):
                banned[row, [position[item] for item in exclude[i] if item in position]] = True
        items, scores = beam_search(model, trie, ids.to(device), mask.to(device), width, banned)
        for row, i in enumerate(chunk):
            results[i] = [
                (trie.item_ids[int(item)], float(score))
                for item, score in zip(items[row, :k], scores[row, :k], strict=True)
                if item >= 0
            ]
    return results
