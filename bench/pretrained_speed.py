"""What a real vocabulary costs: SmolLM2-135M-Instruct (49,152 tokens) decoding, rolling out and training on a
run's prompts, each measured against a plain forward pass of the same model in the same process.

Paths (per CPU-second of this process, `time.process_time`, so another job on the machine does not skew them):
  plain forward      `model(input_ids, attention_mask)` over the users' prompts: full logits at every position, the
                     cost a scoring pass pays, in tokens per CPU-second
  ours               `rlrec.decoding.recommend`: constrained top-K beam over the catalogue trie, the prompt's cache
                     stored once per prompt, only beams inside an item fed (what evaluation and the guards run)
  repeated prompt    the same search with the prompt's cache repeated to every beam and every beam fed each step
                     (what a model `shared_prompt_attention` cannot serve gets, and what rlrec did before)
  rollout            one constrained beam of width G per prompt (GRPO's `rollout: beam`)
  LoRA train step    forward + backward of the same prompts under LoRA r=16 on every linear layer, loss on the
                     last 40% of each prompt's tokens through the plain head (what SFT rows cost)
A decoding path's tokens are the ones it feeds the model: the prompt once, then one token per fed beam per step.
"x plain per user" is a path's CPU seconds per user over what a plain forward pass of the same number of tokens
costs: the overhead of the search itself (1.0 = none).

    python bench/pretrained_speed.py --data runs/ml100k-smollm2-title/data [--users 48] [--threads 1] [--out f.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import peft
import torch

from rlrec.data.prepared import load_run_data
from rlrec.decoding import beam, recommend
from rlrec.decoding.beam import beam_search, left_pad
from rlrec.decoding.inputs import ModelInputs
from rlrec.models import load_model, model_folder
from rlrec.upstream import unfuse_lm_head

SMOLLM2 = "../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"


class TokenCounter:
    """Counts the tokens a model is fed (non-padding prompt tokens, one per fed row in a cached step)."""

    def __init__(self, model) -> None:
        self.tokens = 0
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs) -> None:
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if ids is not None:
            self.tokens += int(mask.sum()) if mask is not None and mask.shape == ids.shape else ids.numel()


def cpu_seconds(fn) -> tuple[float, object]:
    started = time.process_time()
    result = fn()
    return time.process_time() - started, result


@contextlib.contextmanager
def repeated_prompt():
    """The search without `shared_prompt_attention`: every beam holds its own copy of the prompt's cache."""
    shared = beam.shared_prompt_attention

    @contextlib.contextmanager
    def unavailable(*args, **kwargs):
        yield None

    beam.shared_prompt_attention = unavailable
    try:
        yield
    finally:
        beam.shared_prompt_attention = shared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a prepared data folder (runs/<name>/data)")
    parser.add_argument("--model", default=SMOLLM2, help="model folder, hub id or .gguf file")
    parser.add_argument("--users", type=int, default=48)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rollout-g", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_run_data(args.data)
    model, tokenizer = load_model(model_folder(args.model))
    model.float().eval()
    parameters = sum(p.numel() for p in model.parameters())
    counter = TokenCounter(model)
    inputs = ModelInputs.build(tokenizer, data.identifiers, data.prompt)
    rows = data.sample("test", args.users, seed=0)
    prompts = inputs.prompt_ids(tokenizer, rows)
    pad = tokenizer.pad_token_id
    batches = [left_pad(prompts[i : i + args.batch], pad) for i in range(0, len(prompts), args.batch)]
    recommend(model, tokenizer, prompts[: args.batch], args.k, inputs.trie, batch_size=args.batch)  # warm-up

    results: dict[str, dict] = {}

    def measure(name: str, fn, users: int) -> None:
        counter.tokens = 0
        seconds, _ = cpu_seconds(fn)
        results[name] = {"cpu_seconds": round(seconds, 2), "tokens": counter.tokens,
                         "tokens_per_cpu_s": round(counter.tokens / seconds, 1),
                         "users_per_cpu_s": round(users / seconds, 3)}  # fmt: skip

    with torch.no_grad():
        measure("plain forward", lambda: [model(input_ids=i, attention_mask=m) for i, m in batches], len(prompts))
    measure("ours", lambda: recommend(model, tokenizer, prompts, args.k, inputs.trie, batch_size=args.batch),
            len(prompts))  # fmt: skip
    with repeated_prompt():
        measure("repeated prompt", lambda: recommend(model, tokenizer, prompts, args.k, inputs.trie,
                                                     batch_size=args.batch), len(prompts))  # fmt: skip
    rollout_batches = [left_pad(prompts[i : i + 4], pad) for i in range(0, len(prompts), 4)]
    measure(f"rollout (beam G={args.rollout_g})",
            lambda: [beam_search(model, inputs.trie, i, m, args.rollout_g) for i, m in rollout_batches],
            len(prompts))  # fmt: skip

    lora = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                      target_modules="all-linear", task_type="CAUSAL_LM"))  # fmt: skip
    unfuse_lm_head(lora.get_base_model())
    lora.train()

    def train_steps() -> None:
        for i in range(0, len(prompts), 2):  # the SFT recipes' micro-batch of 2 rows
            ids, mask = left_pad(prompts[i : i + 2], pad)
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, : int(ids.shape[1] * 0.6)] = -100
            lora(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).loss.backward()

    measure("LoRA train step (fwd+bwd)", train_steps, len(prompts))

    plain = results["plain forward"]["tokens_per_cpu_s"]
    for result in results.values():
        result["x_plain_per_token"] = round(plain / result["tokens_per_cpu_s"], 3)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads {args.threads}, "
          f"torch {torch.__version__}, python {sys.version.split()[0]}")  # fmt: skip
    print(f"model: {args.model} ({parameters / 1e6:.1f}M parameters, vocabulary {len(tokenizer):,}); catalogue "
          f"{len(data.item_ids):,} items, identifiers up to {inputs.trie.max_length} tokens; {len(prompts)} test "
          f"users, prompts of {sum(map(len, prompts)) / len(prompts):.0f} tokens on average; top-{args.k} beam, "
          f"batch {args.batch}\n")  # fmt: skip
    print("| path | tokens / CPU-s | users / CPU-s | CPU-s per token, x plain forward |")
    print("|---|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {result['tokens_per_cpu_s']:.1f} | {result['users_per_cpu_s']:.3f} | "
              f"{result['x_plain_per_token']:.2f} |")  # fmt: skip
    ratio = results["ours"]["x_plain_per_token"]
    speedup = results["ours"]["users_per_cpu_s"] / results["repeated prompt"]["users_per_cpu_s"]
    print(f"\ndecoding per user / a plain forward pass of the same tokens: {ratio:.2f}x (target <= 1.3x)")
    print(f"ours / repeated prompt, users per CPU-second: {speedup:.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"results": results, "parameters": parameters, "users": len(prompts),
                                        "threads": args.threads, "decoding_x_plain": ratio,
                                        "speedup_over_repeated": round(speedup, 3)}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
