"""Every reach into the internals of TRL, PEFT and transformers, in one place.

rlrec composes the libraries it builds on through their public seams (trainers, `rollout_func`, callbacks, reward
functions). Where that is not enough, the workaround lives here, with a comment naming the upstream behaviour it
depends on, and `tests/test_upstream.py` holds a test per workaround that fails when that behaviour changes: an
upgrade then breaks a test here instead of silently changing what a stage trains or measures.

    unfuse_lm_head            TRL 1.16's fused LM head reads `get_output_embeddings().weight` directly
    copy_reference_tokens     TRL 1.16's DPO "ref" adapter copy skips PEFT trainable-token rows
    preference_trainer        TRL 1.16 DPOTrainer's private `_prepare_dataset` / `_compute_loss`
    log_metric                TRL 1.16 trainers' private `_metrics` lists
    reorder_generated_cache   transformers 5 `DynamicCache.layers[i].keys / .values`
    tensorboard_dir           transformers 5 reads the TensorBoard folder from an environment variable

Third-party imports stay inside the functions: decoding imports this module, and `import trl` costs seconds.
"""

from __future__ import annotations

import contextlib
import functools
import os
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

# --- PEFT wrappers ----------------------------------------------------------------------------------------------------


def unwrap_peft(model):
    """The transformers model under a PEFT wrapper (the object TRL's `add_fused_lm_head` patches), or the model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def has_token_adapters(model) -> bool:
    """Whether PEFT wraps the output layer (trainable_token_indices or modules_to_save on the LM head/embeddings).

    Upstream: PEFT 0.21 replaces a module named in `trainable_token_indices` / `modules_to_save` by a
    `TrainableTokensWrapper` / `ModulesToSaveWrapper` from `peft.utils.other` (not exported at the top level)."""
    from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

    head = unwrap_peft(model).get_output_embeddings()
    return isinstance(head, (TrainableTokensWrapper, ModulesToSaveWrapper))


# --- TRL's fused LM head ----------------------------------------------------------------------------------------------


def logit_scale(config) -> float:
    """The multiplier a model applies to its logits before soft-capping, read as TRL 1.16's `add_fused_lm_head`
    reads it (Cohere `logit_scale`, `output_multiplier`, Falcon-H1 `lm_head_multiplier`, Granite `logits_scaling`)."""
    text = config.get_text_config()
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(text, name, None) is not None:
            return getattr(text, name)
    scaling = getattr(text, "logits_scaling", None)
    if scaling is not None:
        return scaling if text.model_type == "hyperclovax" else 1 / scaling
    return 1.0


def unfuse_lm_head(model, temperature: float = 1.0, label_smoothing: float = 0.0) -> None:
    """Replace TRL's fused LM head (`add_fused_lm_head`) on `model` by a plain one with the same outputs.

    Upstream: TRL 1.16's fused head reads `get_output_embeddings().weight` and `.bias` directly. Under PEFT's token
    adapters that module is a wrapper: with `trainable_token_indices` it has no `bias` (AttributeError), and its
    `.weight` is the frozen original either way, so the trained identifier rows would never reach the
    log-probabilities. The plain forward runs the decoder, then the output layer (through any wrapper) only on the
    labelled positions: with completion-only losses that is a few tokens per row, so it is also much cheaper than
    the chunked kernel for small vocabularies. Same fields as TRL's `FusedCausalLMOutput` (the logit scale and
    soft-capping applied as TRL applies them), and the same `fused_lm_head=True` call signature the trainers use.

    `label_smoothing` > 0 (SFT only): the returned `log_probs`, which TRL's SFT loss negates and averages, are the
    smoothed log-likelihood `(1 - eps) * log p(target) + eps * mean_v log p(v)`, transformers' `LabelSmoother`
    objective, computed on the labelled positions only. TRL's own label smoothing needs the full logits of every
    position and a second forward pass (3.2x the CPU time of a Scientific run, docs/sft.md)."""
    from trl.trainer.utils import FusedCausalLMOutput

    original = type(model).forward
    scale = logit_scale(model.config)
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)

    @functools.wraps(original)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return original(self, *args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        kwargs["use_cache"] = False
        kwargs.pop("logits_to_keep", None)  # the labels say which positions are scored
        hidden = self.get_decoder()(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100
        target = labels[mask]
        logits = self.get_output_embeddings()(hidden[mask]).float() * scale
        if softcap:  # Gemma-style final soft-capping, as the model's own forward applies it
            logits = torch.tanh(logits / softcap) * softcap
        logits = logits / temperature
        logprobs = F.log_softmax(logits, dim=-1)

        def scatter(values):
            full = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
            full[mask] = values
            return full

        per_token = logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        if label_smoothing:
            per_token = (1 - label_smoothing) * per_token + label_smoothing * logprobs.mean(-1)
        per_token = scatter(per_token)
        loss = -per_token.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(
            loss=loss, log_probs=per_token, entropy=scatter(-(logprobs.exp() * logprobs).sum(-1)),
            log_sum_sq_probs=scatter(torch.logsumexp(2 * logprobs, dim=-1).detach()),
            mean_logits=scatter(logits.mean(-1).detach()), is_top1=scatter(logits.argmax(-1) == target),
            label_mask=mask,
        )  # fmt: skip

    model.forward = types.MethodType(forward, model)


# --- TRL's DPOTrainer -------------------------------------------------------------------------------------------------


def copy_reference_tokens(model) -> int:
    """Make TRL's "ref" adapter an exact copy of the adapter being trained; returns the parameters copied.

    Upstream: TRL 1.16 builds the reference of a PEFT model that already holds an adapter by adding a "ref" adapter
    and copying the parameters whose names contain `.default.`. PEFT's trainable-token rows (the identifier tokens)
    are named `...trainable_tokens_delta.default`, with no dot after it, so they stayed at their initial values: the
    reference of a second round was not the model it starts from."""
    if "ref" not in getattr(model, "peft_config", {}):
        return 0
    params = dict(model.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, param in params.items():
            ref = name[: -len(".default")] + ".ref" if name.endswith(".default") else None
            if ref in params:
                params[ref].copy_(param)
                copied += 1
    return copied


# The loss hook of `preference_trainer`: (trainer, model, inputs) -> (loss, outputs).
LossHook = Callable[[object, object, dict], tuple[torch.Tensor, object]]


def preference_trainer(loss: LossHook | None, **kwargs):
    """A TRL `DPOTrainer` on rows already tokenised from the catalogue trie, with an optional loss of our own.

    Upstream: TRL 1.16's `DPOTrainer` tokenises text rows in its private `_prepare_dataset(dataset,
    processing_class, args, dataset_name)` and computes its pairwise loss in the private `_compute_loss(model,
    inputs, return_outputs)`. Our rows are token ids from the catalogue trie (what constrained decoding emits), so
    `_prepare_dataset` passes them through; with `loss` given (S-DPO), `_compute_loss` calls it instead of the
    pairwise loss. Everything else (reference model or adapter, optimiser, logging, checkpoints) is TRL's."""
    from trl import DPOTrainer

    class PreferenceTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def _compute_loss(self, model, inputs, return_outputs):
            if loss is None:
                return super()._compute_loss(model, inputs, return_outputs)
            value, outputs = loss(self, model, inputs)
            return (value, outputs) if return_outputs else value

    return PreferenceTrainer(**kwargs)


def log_metric(trainer, key: str, value: float) -> None:
    """Add a value to what a TRL trainer logs at its next logging step (the mean of the values since the last one).

    Upstream: TRL 1.16 trainers collect per-step values in the private `_metrics["train" | "eval"][key]` lists and
    average them in `log`; `compute_loss` of DPOTrainer fills them the same way."""
    mode = "train" if trainer.model.training else "eval"
    trainer._metrics[mode][key].append(value)


# --- transformers -----------------------------------------------------------------------------------------------------


def reorder_generated_cache(cache, parents: torch.Tensor, generated: int) -> None:
    """Reorder a KV cache to the chosen parent beams, moving only the last `generated` positions.

    In our beam search parents always belong to the same prompt and the prompt's keys/values are identical across
    its beams, so only the generated positions need moving: a copy of a few positions instead of the whole cache
    each step (the full reorder cost 1.5x the forward passes). Upstream: transformers 5's `DynamicCache` holds one
    layer object per decoder layer in `cache.layers`, with `keys` / `values` tensors [beams, heads, positions, dim];
    any other cache falls back to its own full `reorder_cache`."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(getattr(layer, "keys", None) is not None for layer in layers):
        cache.reorder_cache(parents)
        return
    for layer in layers:
        layer.keys[:, :, -generated:] = layer.keys[:, :, -generated:][parents]
        layer.values[:, :, -generated:] = layer.values[:, :, -generated:][parents]


@contextlib.contextmanager
def tensorboard_dir(path: Path) -> Iterator[None]:
    """Build a trainer inside this block and its TensorBoard logs go to `path`.

    Upstream: transformers 5 dropped `TrainingArguments.logging_dir`; its `TensorBoardCallback` reads the folder
    from `TENSORBOARD_LOGGING_DIR` when the callback is constructed, i.e. when the trainer is. Setting the variable
    only around construction gives each trainer its own folder (a process that builds several, such as DPO's
    rounds, used to write every round into the first one's) and leaves the environment as it was."""
    before = os.environ.get("TENSORBOARD_LOGGING_DIR")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
        else:
            os.environ["TENSORBOARD_LOGGING_DIR"] = before
