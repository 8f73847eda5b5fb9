"""SFT throughput by row layout: target items learned per CPU-second, in one process, one thread, one model.

Layouts compared on the same prepared data (its training split, its identifiers), the same model and batch size,
each trained for the same number of steps with TRL's SFTTrainer:
  chat-compact    one chat row per target, prompt "History: <ids>" (the baseline the ratios are against)
  chat-english    one chat row per target, the English default prompt ("The user interacted with these items ...")
  seq-target      the sequence prompt format, one row per target (rlrec.training.sft_rows.target_rows)
  seq-rows        the sequence prompt format, one row per user window, a loss on every item (sequence_rows)
The CPU time is the process's own (user + system) during `trainer.train()`, so other jobs on the machine do not
distort it. Targets per step = the batch's rows times the mean targets a row holds.

    python bench/sft_throughput.py --data runs/<name>/data [--steps 40] [--batch 64] [--out docs/sft_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import trl
from transformers import TrainerCallback

from rlrec.data.prepared import load_run_data
from rlrec.decoding.inputs import ModelInputs
from rlrec.models import build_tokenizer, tiny_phi
from rlrec.prompts import prompt_messages
from rlrec.schema import PromptConfig
from rlrec.training.sft_rows import sequence_rows, target_rows
from rlrec.upstream import unfuse_lm_head

COMPACT = PromptConfig(identifier="sid", template="History: {history}", separator=" ")
ENGLISH = PromptConfig(identifier="sid")  # the default template and separator
SEQUENCE = PromptConfig(format="sequence", identifier="sid", template="History: {history}", separator=" ")


def chat_rows(data, prompt: PromptConfig):
    from datasets import Dataset

    train = data.rows("train")
    return Dataset.from_dict({
        "prompt": [prompt_messages(h, data.identifiers, prompt) for h in train["history"]],
        "completion": [[{"role": "assistant", "content": data.identifiers[t]}] for t in train["target"]],
    })  # fmt: skip


def layouts(data, tokenizer) -> dict:
    inputs = ModelInputs.build(tokenizer, data.identifiers, SEQUENCE)
    seq = sequence_rows(data, inputs, min_history=1)
    target = target_rows(data, inputs)
    return {
        "chat-compact": (chat_rows(data, COMPACT), 1.0),
        "chat-english": (chat_rows(data, ENGLISH), 1.0),
        "seq-target": (target.remove_columns(["targets", "user"]), 1.0),
        "seq-rows": (seq.remove_columns(["targets", "user"]), sum(seq["targets"]) / len(seq)),
    }


def measure(name: str, rows, tokenizer, steps: int, batch: int, hidden: int) -> float:
    """CPU seconds per step of `steps` SFT steps (after one warm-up step)."""
    torch.manual_seed(0)
    model = tiny_phi(tokenizer, hidden_size=hidden, layers=2, heads=2)
    unfuse_lm_head(model)
    with tempfile.TemporaryDirectory() as out:
        args = trl.SFTConfig(output_dir=out, max_steps=steps + 1, per_device_train_batch_size=batch, report_to=[],
                             use_cpu=True, bf16=False, learning_rate=1e-3, save_strategy="no", logging_steps=10**6,
                             completion_only_loss=True, max_length=256, disable_tqdm=True,
                             train_sampling_strategy="group_by_length", dataloader_num_workers=0)  # fmt: skip
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=rows.shuffle(seed=0), processing_class=tokenizer)
        times: list[float] = []

        class StepClock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                times.append(time.process_time())

            def on_train_end(self, args, state, control, **kwargs):
                times.append(time.process_time())

        trainer.add_callback(StepClock())
        trainer.train()
    return (times[-1] - times[1]) / steps  # from the start of step 2: the first step warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a prepared data folder with semantic-ID identifiers")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--out", help="write the table as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    data = load_run_data(args.data)
    texts = [ENGLISH.template, COMPACT.template, *data.identifiers.values()]
    tokenizer = build_tokenizer(texts)
    results = {}
    for name, (rows, targets_per_row) in layouts(data, tokenizer).items():
        seconds = measure(name, rows, tokenizer, args.steps, args.batch, args.hidden)
        results[name] = {"cpu_s_per_step": round(seconds, 4), "targets_per_row": round(targets_per_row, 3),
                         "targets_per_cpu_s": round(args.batch * targets_per_row / seconds, 1)}  # fmt: skip
        print(
            f"{name:13s} {seconds:.4f} CPU s/step, {targets_per_row:.2f} targets/row, "
            f"{results[name]['targets_per_cpu_s']:,.1f} targets/CPU-s",
            flush=True,
        )
    base = results["chat-compact"]["targets_per_cpu_s"]
    print("\nlayout         targets/CPU-s   ratio to chat-compact")
    for name, row in results.items():
        row["ratio_to_chat_compact"] = round(row["targets_per_cpu_s"] / base, 3)
        print(f"{name:13s}  {row['targets_per_cpu_s']:12,.1f}   {row['ratio_to_chat_compact']:.2f}x")
    if args.out:
        meta = {"command": " ".join(sys.argv), "data": args.data, "steps": args.steps, "batch": args.batch,
                "hidden": args.hidden, "python": platform.python_version(), "torch": torch.__version__}  # fmt: skip
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
