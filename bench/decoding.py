"""Constrained top-K decoding speed, in one process, on one model, one thread, the same prompts and catalogue.

Paths compared (users/second, higher is better):
  ours           rlrec.decoding.recommend: batched beam search over the trie, prefill once, cache expanded
  dict-generate  transformers `generate` beam search with PrefixConstrainedLogitsProcessor over a dict trie
                 (the approach of MiniOneRec, D3 and BIGRec), keyed on the generated tokens
  unconstrained  `generate` beam search with no constraint
  forward-only   the lower bound: prefill once, expand the cache to the beams, run the single-token steps,
                 no search logic at all
and the share of users whose top-K list (ordered) from `ours` equals the dict-generate path's.

Default setup: ../shared/data/amazon18-scientific, the collision-free `rqvae_zcr` index (4,344 items, 4 codes
+ stop token), leave-one-out test prompts of the first 64 users, beam width 20 = K, a from-scratch Llama of about
4.7M parameters (hidden 256, 4 layers), one thread.

    python bench/decoding.py [--data ../shared/data/amazon18-scientific] [--users 64] [--beam 20] [--out file.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

from rlrec.decoding import ItemTrie, items_from_generations, recommend
from rlrec.decoding.beam import encode_prompts, left_pad
from rlrec.items.index import read_index
from rlrec.models import build_tokenizer, tiny_llama

TEMPLATE = "The user interacted with these items in order: {history}. Which item will the user interact with next?"


def load_prompts(data: Path, users: int) -> tuple[list[list[dict]], dict[str, str]]:
    index = read_index(data / "indexes/rqvae_zcr/Scientific.index.json")
    identifiers = {item: "".join(codes) for item, codes in index.items()}
    sequences = json.loads((data / "Scientific.inter.json").read_text())
    prompts = []
    for items in list(sequences.values())[:users]:
        history = ", ".join(identifiers[str(i)] for i in items[:-1][-20:])  # leave-one-out test history
        prompts.append([{"role": "user", "content": TEMPLATE.replace("{history}", history)}])
    return prompts, identifiers


def dict_trie(trie: ItemTrie) -> dict[tuple[int, ...], list[int]]:
    table: dict[tuple[int, ...], set[int]] = {}
    for sequence in trie.sequences:
        for t in range(len(sequence)):
            table.setdefault(tuple(sequence[:t]), set()).add(sequence[t])
    return {prefix: sorted(tokens) for prefix, tokens in table.items()}


def batches(tokenizer, prompts, size: int):
    encoded = encode_prompts(tokenizer, prompts)
    for start in range(0, len(encoded), size):
        yield left_pad(encoded[start : start + size], tokenizer.pad_token_id)


def run_generate(model, tokenizer, prompts, trie, beam, size, constrained: bool) -> list[list[str]]:
    table = dict_trie(trie)
    lists = []
    for ids, mask in batches(tokenizer, prompts, size):
        width = ids.shape[1]

        def allowed(batch_id, sent, width=width):  # MiniOneRec-style lookup in a dict of prefixes
            return table.get(tuple(sent[width:].tolist()), [trie.stop_token])

        processors = [PrefixConstrainedLogitsProcessor(allowed, beam)] if constrained else []
        out = model.generate(
            input_ids=ids, attention_mask=mask, num_beams=beam, num_return_sequences=beam, do_sample=False,
            max_new_tokens=trie.max_length, eos_token_id=trie.stop_token, pad_token_id=tokenizer.pad_token_id,
            logits_processor=processors, length_penalty=0.0,
        )  # fmt: skip
        if constrained:
            items = items_from_generations(trie, out, width)
            lists.extend(items[i : i + beam] for i in range(0, len(items), beam))
    return lists


@torch.no_grad()
def run_forward_only(model, tokenizer, prompts, trie, beam, size) -> None:
    for ids, mask in batches(tokenizer, prompts, size):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        cache.batch_repeat_interleave(beam)
        mask = mask.repeat_interleave(beam, dim=0)
        position = positions[:, -1:].repeat_interleave(beam, dim=0)
        tokens = torch.full((len(mask), 1), trie.sequences[0][0])
        for _ in range(trie.max_length - 1):
            mask = torch.cat([mask, mask.new_ones((len(mask), 1))], dim=1)
            position = position + 1
            model(input_ids=tokens, attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True)


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time over `repeats` runs (allocation and page-fault noise on a shared CPU is about 5%)."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = Path(os.environ.get("RLREC_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared/data"))
    parser.add_argument("--data", type=Path, default=default / "amazon18-scientific")
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--beam", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    prompts, identifiers = load_prompts(args.data, args.users)
    tokenizer = build_tokenizer([p[0]["content"] for p in prompts] + list(identifiers.values()))
    # Every path sees the same batches: sorted by prompt length, as `recommend` does internally.
    prompts.sort(key=lambda p: len(encode_prompts(tokenizer, [p])[0]))
    model = tiny_llama(tokenizer, hidden_size=args.hidden, layers=args.layers, heads=4, seed=0).eval()
    with torch.no_grad():  # a peaked random model: fewer exact ties between items than at the default init
        model.get_input_embeddings().weight.normal_(0, 1.0)
    trie = ItemTrie.build(tokenizer, identifiers)
    params = sum(p.numel() for p in model.parameters())

    warm = prompts[: args.batch]
    recommend(model, tokenizer, warm, args.beam, trie, batch_size=args.batch)
    run_generate(model, tokenizer, warm, trie, args.beam, args.batch, constrained=True)
    results, n = {}, args.repeats
    results["ours"], ours = timed(
        lambda: recommend(model, tokenizer, prompts, args.beam, trie, batch_size=args.batch), n
    )
    results["dict-generate"], generated = timed(
        lambda: run_generate(model, tokenizer, prompts, trie, args.beam, args.batch, True), n)  # fmt: skip
    results["unconstrained"], _ = timed(
        lambda: run_generate(model, tokenizer, prompts, trie, args.beam, args.batch, False), n)  # fmt: skip
    results["forward-only"], _ = timed(
        lambda: run_forward_only(model, tokenizer, prompts, trie, args.beam, args.batch), n)  # fmt: skip
    same = sum([i for i, _ in o] == g for o, g in zip(ours, generated, strict=True)) / len(prompts)

    speed = {name: len(prompts) / seconds for name, seconds in results.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads {args.threads}, "
          f"torch {torch.__version__}, python {sys.version.split()[0]}")  # fmt: skip
    print(
        f"model: {params / 1e6:.2f}M parameters; catalogue {len(identifiers)} items, identifiers of "
        f"{trie.max_length} tokens incl. stop; beam {args.beam}; {len(prompts)} users, batch {args.batch}; "
        f"median of {n} runs\n"
    )
    print("| path | users/s |")
    print("|---|---|")
    for name, value in speed.items():
        print(f"| {name} | {value:.1f} |")
    ratios = {
        "ours / dict-generate": speed["ours"] / speed["dict-generate"],
        "ours / unconstrained": speed["ours"] / speed["unconstrained"],
        "forward-only / ours": speed["forward-only"] / speed["ours"],
    }
    print()
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    print(f"same top-{args.beam} list as dict-generate: {same:.1%} of users")
    if args.out:
        args.out.write_text(json.dumps({"users_per_s": speed, "ratios": ratios, "agreement": same,
                                        "parameters": params}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
