"""Baselines scored by the same harness as the generative models: most-popular and SASRec.

Training sequences are rebuilt from the train split (`rlrec.data.prepared.training_sequences`: items[:-2] under
leave-one-out) and cut into windows of `max_len + 1` items from the end, each window overlapping the previous by
one item, so that every train transition is predicted exactly once (`window_bounds`, shared with sequence SFT).
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from rlrec.baselines.sasrec import SASRec
from rlrec.data.prepared import RunData, training_sequences, window_bounds
from rlrec.errors import RlrecError
from rlrec.metrics import accuracy_metrics
from rlrec.schema import SASRecConfig


def topk_from_scores(
    scores: torch.Tensor, k: int, item_ids: Sequence[str], exclude: Sequence[Sequence[str]] | None = None
) -> list[list[str]]:
    """Top-k item ids per row of a [users, items] score matrix (columns follow `item_ids`)."""
    if exclude is not None:
        position = {item: i for i, item in enumerate(item_ids)}
        scores = scores.clone()
        for row, items in enumerate(exclude):
            scores[row, [position[i] for i in items if i in position]] = float("-inf")
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices.tolist()
    return [[item_ids[i] for i in row] for row in top]


def most_popular_lists(data: RunData, n_rows: int, k: int, exclude=None) -> list[list[str]]:
    # Ties broken by catalogue order: a rank from a stable sort of the counts, so the scores are distinct integers.
    # (A decreasing 1e-6 offset on float32 counts, as before, fell below float32 spacing from a count of about 8 up:
    # ten items tied at 5,000 kept one score, and topk broke their ties as it liked.)
    counts = torch.tensor([data.popularity.get(i, 0) for i in data.item_ids], dtype=torch.float64)
    order = torch.argsort(-counts, stable=True)
    scores = torch.empty_like(counts)
    scores[order] = -torch.arange(len(counts), dtype=torch.float64)
    return topk_from_scores(scores.expand(n_rows, -1), k, data.item_ids, exclude)


def windows(sequences: list[list[int]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded (inputs, targets) windows [n, max_len]: targets[t] = the item after inputs[..t]."""
    inputs, targets = [], []
    for seq in sequences:
        for start, end in window_bounds(len(seq), max_len + 1):
            chunk = seq[start:end]
            pad = max_len + 1 - len(chunk)
            padded = [0] * pad + chunk
            inputs.append(padded[:-1])
            targets.append([0 if i < pad else t for i, t in enumerate(padded[1:])])  # no target after a pad
    return np.array(inputs, dtype=np.int64), np.array(targets, dtype=np.int64)


def encode_histories(histories, index: dict[str, int], max_len: int) -> torch.Tensor:
    out = torch.zeros((len(histories), max_len), dtype=torch.long)
    for row, history in enumerate(histories):
        ids = [index[i] for i in history[-max_len:]]
        if ids:
            out[row, max_len - len(ids) :] = torch.tensor(ids)
    return out


@torch.no_grad()
def sasrec_lists(model: SASRec, data: RunData, rows, k: int, exclude_history: bool) -> list[list[str]]:
    model.eval()
    index = {item: i + 1 for i, item in enumerate(data.item_ids)}
    lists: list[list[str]] = []
    size = model.config.eval_batch_size
    for start in range(0, len(rows), size):
        histories = rows["history"][start : start + size]
        scores = model.scores(encode_histories(histories, index, model.config.max_len))
        lists.extend(topk_from_scores(scores, k, data.item_ids, histories if exclude_history else None))
    return lists


def train_sasrec(
    data: RunData, config: SASRecConfig, seed: int, log: Callable[[dict], None], train_split: str = "train",
    state: dict | None = None, save_state: Callable[[dict], None] | None = None,
) -> tuple[SASRec, dict]:  # fmt: skip
    """Train to convergence with early stopping on valid NDCG@10; return the best model and a summary.

    After every epoch `save_state` gets everything needed to continue (weights, optimizer, the best epoch so far,
    the random generators), and `state` resumes from it: a resumed run trains the same epochs on the same batches
    as an uninterrupted one. `config.time_budget_s` stops after the epoch that used up the budget (the best epoch
    is kept, as on early stopping); the time of earlier, interrupted runs counts."""
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(seed)
    index = {item: i + 1 for i, item in enumerate(data.item_ids)}
    sequences = [[index[i] for i in seq] for seq in training_sequences(data, train_split)]
    inputs, targets = (torch.from_numpy(a) for a in windows(sequences, config.max_len))
    valid = data.rows("valid")
    model = SASRec(len(data.item_ids), config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch, stale, first, spent = -1.0, None, 0, 0, 1, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])  # dropout
        best, best_state, best_epoch, stale = state["best"], state["best_state"], state["best_epoch"], state["stale"]
        first, spent = state["epoch"] + 1, state["seconds"]
    started = time.time() - spent
    stopped, epoch = "max_epochs", first - 1
    bar = tqdm(range(first, config.max_epochs + 1), desc="sasrec", unit="epoch", initial=first - 1,
               total=config.max_epochs)  # fmt: skip
    for epoch in bar:
        model.train()
        total, batches = 0.0, 0
        for batch in torch.randperm(len(inputs), generator=gen).split(config.batch_size):
            loss = model.loss(inputs[batch], targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        lists = sasrec_lists(model, data, valid, 10, exclude_history=False)
        metrics = accuracy_metrics(lists, valid["target"], [10])
        log({"epoch": epoch, "loss": round(total / batches, 5), "valid_ndcg@10": round(metrics["ndcg@10"], 5),
             "valid_hr@10": round(metrics["hr@10"], 5), "seconds": round(time.time() - started, 1)})  # fmt: skip
        bar.set_postfix(loss=f"{total / batches:.4f}", ndcg10=f"{metrics['ndcg@10']:.4f}", best_epoch=best_epoch)
        if metrics["ndcg@10"] > best:
            best, best_state, best_epoch, stale = metrics["ndcg@10"], copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
        if save_state is not None:
            save_state({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "generator": gen.get_state(),
                        "torch_rng": torch.get_rng_state(), "best": best, "best_state": best_state,
                        "best_epoch": best_epoch, "stale": stale, "epoch": epoch,
                        "seconds": time.time() - started})  # fmt: skip
        if stale >= config.patience:
            stopped = "patience"
            break
        if config.time_budget_s is not None and time.time() - started >= config.time_budget_s:
            stopped = "time_budget"
            print(f"rlrec sasrec: time budget of {config.time_budget_s:g} s used after epoch {epoch}; keeping the best "
                  f"epoch ({best_epoch})", file=sys.stderr)  # fmt: skip
            break
    if best_state is None:
        raise RlrecError(f"sasrec: no epoch was trained (resumed at epoch {first} of max_epochs {config.max_epochs})")
    model.load_state_dict(best_state)
    summary = {"best_epoch": best_epoch, "epochs_run": epoch, "stopped": stopped, "best_valid_ndcg@10": round(best, 6),
               "train_windows": len(inputs), "train_seconds": round(time.time() - started, 1),
               "resumed_from_epoch": first - 1 if state is not None else None,
               "parameters": sum(p.numel() for p in model.parameters())}  # fmt: skip
    return model, summary


def save_sasrec(model: SASRec, out: Path) -> None:
    torch.save({"state_dict": model.state_dict(), "num_items": model.items.num_embeddings - 1}, out / "model.pt")


def load_sasrec(path: Path, config: SASRecConfig) -> SASRec:
    payload = torch.load(path / "model.pt", map_location="cpu")
    model = SASRec(payload["num_items"], config)
    model.load_state_dict(payload["state_dict"])
    return model
