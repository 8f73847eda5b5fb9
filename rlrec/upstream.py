"""Every reach into the internals of TRL, PEFT and transformers, in one place.

rlrec composes the libraries it builds on through their public seams (trainers, `rollout_func`, callbacks, reward
functions). Where that is not enough, the workaround lives here, with a comment naming the upstream behaviour it
depends on, and `tests/test_upstream.py` holds a test per workaround that fails when that behaviour changes: an
upgrade then breaks a test here instead of silently changing what a stage trains or measures.

    unfuse_lm_head            TRL 1.16's fused LM head reads `get_output_embeddings().weight` directly
    unfuse_sft_head           TRL 1.16 SFTTrainer smooths labels through `trainer.label_smoother`
    reference_logps           TRL 1.16 DPOTrainer's `compute_ref_log_probs` returns the batch's two halves
    generation_model          TRL 1.16's `unwrap_model_for_generation` (ZeRO-3 gathers, DDP unwrapping)
    copy_reference_tokens     TRL 1.16's DPO "ref" adapter copy skips PEFT trainable-token rows
    preference_trainer        TRL 1.16 DPOTrainer's private `_prepare_dataset` / `_compute_loss`
    grpo_trainer              TRL 1.16 GRPOTrainer's private `_get_per_token_logps_and_entropies`
    log_metric                TRL 1.16 trainers' private `_metrics` lists
    reorder_generated_cache   transformers 5 `DynamicCache.layers[i].keys / .values`
    shared_prompt_attention   transformers 5 attention functions (`AttentionInterface`), read per `module.layer_idx`
    tensorboard_dir           transformers 5 reads the TensorBoard folder from an environment variable

TRL and PEFT are imported inside the functions that need them: decoding imports this module, and `import trl`
costs seconds; torch is imported at the top, as every caller already has it.
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


# Labelled positions scored per chunk by the plain head: each chunk's [positions, vocabulary] logits live only inside
# its own forward (and again in its backward), so a 49k-token vocabulary costs chunk x 49k floats, not one
# [labelled positions, vocabulary] block per tensor the loss keeps for backward.
HEAD_CHUNK = 256


def unfuse_lm_head(model, temperature: float = 1.0, label_smoothing: float = 0.0) -> None:
    """Replace TRL's fused LM head (`add_fused_lm_head`) on `model` by a plain one with the same outputs.

    Upstream: TRL 1.16's fused head reads `get_output_embeddings().weight` and `.bias` directly. Under PEFT's token
    adapters that module is a wrapper: with `trainable_token_indices` it has no `bias` (AttributeError), and its
    `.weight` is the frozen original either way, so the trained identifier rows would never reach the
    log-probabilities. The plain forward runs the decoder, then the output layer (through any wrapper) only on the
    labelled positions: with completion-only losses that is a few tokens per row, so it is also much cheaper than
    the chunked kernel for small vocabularies. Same fields as TRL's `FusedCausalLMOutput` (the logit scale and
    soft-capping applied as TRL applies them), and the same `fused_lm_head=True` call signature the trainers use.
    The labelled positions go through the output layer `HEAD_CHUNK` at a time under activation checkpointing, and
    the logged statistics (entropy, top-1) are computed without a graph: with SmolLM2's 49k vocabulary and 1,200
    labelled positions a batch, the logits and the tensors kept for backward were 2 GB of a 7 GB step.

    `label_smoothing` > 0 (SFT only): the returned `log_probs`, which TRL's SFT loss negates and averages, are the
    smoothed log-likelihood `(1 - eps) * log p(target) + eps * mean_v log p(v)`, transformers' `LabelSmoother`
    objective, computed on the labelled positions only. TRL's own label smoothing needs the full logits of every
    position and a second forward pass (3.2x the CPU time of a Scientific run, docs/sft.md)."""
    from torch.utils.checkpoint import checkpoint
    from trl.trainer.utils import FusedCausalLMOutput

    original = type(model).forward
    scale = logit_scale(model.config)
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)

    def score(head, hidden, target):
        """(log-likelihood of each target [n], its statistics [4, n]: entropy, log sum p^2, mean logit, top-1)."""
        logits = head(hidden).float() * scale
        if softcap:  # Gemma-style final soft-capping, as the model's own forward applies it
            logits = torch.tanh(logits / softcap) * softcap
        logits = logits / temperature
        logprobs = F.log_softmax(logits, dim=-1)
        per_token = logprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        if label_smoothing:
            per_token = (1 - label_smoothing) * per_token + label_smoothing * logprobs.mean(-1)
        with torch.no_grad():
            stats = torch.stack([-(logprobs.exp() * logprobs).sum(-1), torch.logsumexp(2 * logprobs, dim=-1),
                                 logits.mean(-1), (logits.argmax(-1) == target).float()])  # fmt: skip
        return per_token, stats

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
        target, hidden = labels[mask], hidden[mask]
        head = self.get_output_embeddings()
        parts = [checkpoint(score, head, hidden[i : i + HEAD_CHUNK], target[i : i + HEAD_CHUNK], use_reentrant=False)
                 if torch.is_grad_enabled() else score(head, hidden[i : i + HEAD_CHUNK], target[i : i + HEAD_CHUNK])
                 for i in range(0, len(target), HEAD_CHUNK)]  # fmt: skip
        per_token = torch.cat([p for p, _ in parts]) if parts else hidden.new_zeros(0)
        stats = torch.cat([s for _, s in parts], dim=1) if parts else hidden.new_zeros(4, 0)

        def scatter(values):
            full = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
            full[mask] = values
            return full

        per_token = scatter(per_token)
        loss = -per_token.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(
            loss=loss, log_probs=per_token, entropy=scatter(stats[0]), log_sum_sq_probs=scatter(stats[1]),
            mean_logits=scatter(stats[2]), is_top1=scatter(stats[3].bool()), label_mask=mask,
        )  # fmt: skip

    model.forward = types.MethodType(forward, model)


# --- TRL's DPOTrainer -------------------------------------------------------------------------------------------------


def unfuse_sft_head(trainer, label_smoothing: float) -> None:
    """`unfuse_lm_head` on an SFT trainer's model, smoothing labels inside the plain head (on the labelled positions
    only). Upstream: TRL 1.16's SFTTrainer applies `args.label_smoothing_factor` through `trainer.label_smoother`
    on the full logits; left in place, it would smooth a second time and ask for logits the plain head never makes."""
    unfuse_lm_head(unwrap_peft(trainer.model), label_smoothing=label_smoothing)
    trainer.label_smoother = None


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


# --- TRL's GRPOTrainer ------------------------------------------------------------------------------------------------


def shared_prompt_logps(model, input_ids, attention_mask, completion_length: int, temperature: float,
                        entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Per-token log-probabilities (and entropies) of the last `completion_length` tokens of each row, each distinct
    prompt run once: one forward of each distinct prompt (its cache kept, gradients flowing through it), its cache
    repeated to its rows, then one forward of their completion tokens. The same
    numbers as a forward of every full row (tested), for a fraction of the tokens when a group's G completions share
    one long prompt: SmolLM2 on MovieLens titles, 170 prompt tokens and 8 completions of ~12, 266 tokens instead of
    1,456 a group."""
    width = input_ids.size(1) - completion_length
    completion = input_ids[:, width:]
    rows, owner = torch.unique(torch.cat([input_ids[:, :width], attention_mask[:, :width]], dim=1), dim=0,
                               return_inverse=True)  # owner: each row's distinct prompt  # fmt: skip
    unique, unique_mask = rows[:, :width], rows[:, width:]
    positions = (unique_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=unique, attention_mask=unique_mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.reorder_cache(owner)  # index_select on the batch dimension: differentiable
    steps = positions[owner, -1:] + 1 + torch.arange(completion_length, device=input_ids.device)
    rest = model(input_ids=completion, attention_mask=attention_mask, position_ids=steps, past_key_values=cache,
                 use_cache=True, logits_to_keep=completion_length)  # fmt: skip
    logits = torch.cat([out.logits[owner, -1:], rest.logits[:, :-1]], dim=1).float() / temperature
    logprobs = F.log_softmax(logits, dim=-1)
    per_token = logprobs.gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    if not entropy:
        return per_token, None
    with torch.no_grad():
        return per_token, -(logprobs.exp() * logprobs).sum(-1)


def shuffle_whole_groups(batch: dict, size: int) -> dict:
    """TRL's `shuffle_sequence_dict` for a generation batch, permuting groups of `size` consecutive rows (one
    prompt's completions) instead of single rows; rows when they do not divide into groups."""
    rows = len(batch["prompt_ids"])
    if rows % size:
        order = torch.randperm(rows)
    else:
        order = (torch.randperm(rows // size)[:, None] * size + torch.arange(size)).reshape(-1)

    def permute(value):
        if value is None or (isinstance(value, torch.Tensor) and value.ndim == 0):
            return value
        return value[order] if isinstance(value, torch.Tensor) else [value[i] for i in order]

    return {key: permute(value) for key, value in batch.items()}


def grpo_trainer(**kwargs):
    """TRL's `GRPOTrainer` whose log-probabilities of text completions run each distinct prompt once
    (`shared_prompt_logps`): the policy's forward and backward, the reference's and the old policy's forwards.

    Upstream: TRL 1.16 computes every log-probability of a step in the private `_get_per_token_logps_and_entropies(
    model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
    compute_aux_loss=False, **multimodal_inputs) -> (logps, entropies, aux_loss)`, in chunks of `batch_size` rows,
    each a full forward of prompt + completion. TRL also shuffles a step's completions before splitting them into
    micro-batches (`shuffle_sequence_dict`, looked up in its module by `_prepare_inputs`), which scatters each group
    over all of them: here that shuffle permutes whole groups (G consecutive rows, as TRL's RepeatSampler lays them
    out), so a micro-batch of G rows (`grpo.train.grad_accum` = prompts_per_device) holds one prompt. With one
    rollout per optimizer step the micro-batches' gradients are summed, so which rows share a micro-batch does not
    change the step under the `dapo`, `grpo` and `dr_grpo` normalisations. Multimodal inputs, the MoE auxiliary
    loss, an entropy bonus (our entropies are statistics, computed without a graph) and distributed wrappers (DDP,
    DeepSpeed, FSDP, which expect one model call per backward) keep TRL's path.

    It also keeps the batch's dataset rows as `rollout_rows` before TRL's private
    `_generate_and_score_completions(inputs)` calls `rollout_func(prompts, trainer)`, which sees only the prompts:
    target injection (`grpo.inject_target`) needs each prompt's target."""
    import trl.trainer.grpo_trainer as grpo_module
    from accelerate.utils import DistributedType
    from trl import GRPOTrainer

    class SharedPromptGRPOTrainer(GRPOTrainer):
        rollout_rows: list[dict] = []  # the batch's dataset rows, for a rollout that needs more than the prompts

        def _generate_and_score_completions(self, inputs):
            # TRL 1.16 hands `rollout_func` the prompts only; the rows (targets, histories) are its `inputs` here
            self.rollout_rows = inputs
            return super()._generate_and_score_completions(inputs)

        def _prepare_inputs(self, generation_batch):
            original = grpo_module.shuffle_sequence_dict
            grpo_module.shuffle_sequence_dict = lambda batch: shuffle_whole_groups(batch, self.num_generations)
            try:
                return super()._prepare_inputs(generation_batch)
            finally:
                grpo_module.shuffle_sequence_dict = original

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                               **multimodal):  # fmt: skip
            # activation checkpointing turns the KV cache off in training (transformers sets use_cache=False), and
            # the shared prompt needs its cache: TRL's full rows then
            if (compute_aux_loss or any(v is not None for v in multimodal.values()) or self.args.entropy_coef
                    or self.accelerator.distributed_type != DistributedType.NO
                    or self.args.gradient_checkpointing):  # fmt: skip
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                    **multimodal,
                )  # fmt: skip
            size = batch_size or input_ids.size(0)
            parts = []
            for start in range(0, input_ids.size(0), size):
                with self.accelerator.autocast():
                    parts.append(shared_prompt_logps(model, input_ids[start : start + size],
                                                     attention_mask[start : start + size], logits_to_keep,
                                                     self.temperature, compute_entropy))  # fmt: skip
            logps = torch.cat([p for p, _ in parts])
            entropies = torch.cat([e for _, e in parts]) if compute_entropy else None
            return logps, entropies, None

    return SharedPromptGRPOTrainer(**kwargs)


def reference_logps(trainer, inputs: dict) -> torch.Tensor:
    """The reference model's summed completion log-probability of every row of `inputs` [rows], through TRL's own
    reference pass (the separate reference model, or this PEFT model under its "ref" / disabled adapter).

    Upstream: TRL 1.16's `DPOTrainer.compute_ref_log_probs(model, inputs)` returns the batch's per-row sums split
    in two halves (chosen, rejected) by `chunk(2)`; concatenated they are the rows in order, whatever their number.
    With `ld_alpha` set it would weight the tails of the rows instead, so it is refused here."""
    if trainer.ld_alpha is not None:
        raise ValueError("reference_logps needs DPOConfig.ld_alpha=None (whole-completion log-probabilities)")
    reference = trainer.ref_model if trainer.ref_model is not None else trainer.model
    return torch.cat(trainer.compute_ref_log_probs(reference, inputs))


@contextlib.contextmanager
def generation_model(trainer) -> Iterator:
    """The trainer's model ready for generation: unwrapped from DDP, its ZeRO-3 shards gathered, via TRL 1.16's
    `unwrap_model_for_generation` (a `trl.models.utils` helper its own GRPO rollouts use)."""
    from trl.models.utils import unwrap_model_for_generation

    with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as model:
        yield model


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


# The attention implementation that `shared_prompt_attention` switches a model to, and what it reads while on.
SHARED_PROMPT = "rlrec_shared_prompt"
_shared: dict = {}


def _shared_prompt_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of one new token per fed beam over its prompt's keys (stored once per prompt) and its own generated
    ones: the softmax over the joined scores that attention over the prompt repeated to every beam computes.

    query [R, Hq, 1, D] and key/value [R, Hkv, T, D] (the T generated tokens, this step's included) are the R beams
    fed this step, the flat beams `rows` (prompt b's beams are b*W .. b*W + W - 1); the prompt's keys/values
    [B, Hkv, P, D] and keep mask [B, P] are stored once per prompt. Queries are scattered to the full [B*W] layout
    for the prompt part so that it is one batched product per prompt and KV head."""
    if query.shape[2] != 1 or kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise RuntimeError("shared-prompt attention takes single-token steps of full, uncapped attention only")
    keys, values = _shared["keys"][module.layer_idx], _shared["values"][module.layer_idx]
    fed, width = _shared["rows"], _shared["width"]
    batch, kv_heads, prompt_len, dim = keys.shape
    rows, heads = query.shape[0], query.shape[1]
    groups, beams = heads // kv_heads, batch * width
    scaling = dim**-0.5 if scaling is None else scaling

    def by_prompt(x):  # [B*W, Hkv, g, n] -> [B, Hkv, W*g, n]
        return x.reshape(batch, width, kv_heads, groups, -1).transpose(1, 2).reshape(batch, kv_heads, -1, x.shape[-1])

    def by_beam(x):  # [B, Hkv, W*g, n] -> [B*W, Hkv, g, n]
        return x.reshape(batch, kv_heads, width, groups, -1).transpose(1, 2).reshape(beams, kv_heads, groups, -1)

    own = query.reshape(rows, kv_heads, groups, dim)
    scattered = own.new_zeros(beams, kv_heads, groups, dim)
    scattered[fed] = own
    prompt_scores = (by_prompt(scattered) @ keys.transpose(-1, -2)) * scaling  # [B, Hkv, W*g, P]
    prompt_scores = prompt_scores.masked_fill(~_shared["keep"][:, None, None, :], float("-inf"))
    scores = torch.cat([by_beam(prompt_scores)[fed], (own @ key.transpose(-1, -2)) * scaling], dim=-1)
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)  # [R, Hkv, g, P + T]
    to_prompt = probs.new_zeros(beams, kv_heads, groups, prompt_len)
    to_prompt[fed] = probs[..., :prompt_len]
    out = by_beam(by_prompt(to_prompt) @ values)[fed] + probs[..., prompt_len:] @ value
    return out.reshape(rows, 1, heads, dim), None


def _feed_rows(rows: torch.Tensor) -> None:
    _shared["rows"] = rows


@contextlib.contextmanager
def shared_prompt_attention(model, prompt_cache, keep: torch.Tensor, width: int):
    """Inside this block, single-token steps of `model` attend to the prompt keys/values in `prompt_cache` (one row
    per prompt, left-padded as `keep` [B, P] says) plus the generated keys/values in the cache they are given, for
    W = `width` beams per prompt. Yields `feed(rows)`, to be called before each step with the flat beams it feeds
    (prompt b's beams are b*W .. b*W + W - 1); or None, changing nothing, for a model it cannot serve: then the
    caller repeats the prompt's cache to the beams (`batch_repeat_interleave`).

    Why: a beam search that repeats the prompt's cache to W beams copies P positions W times, and `DynamicCache`
    concatenates the whole cache again at every step. With a 135M model, 158-token prompts and W = 20, those copies
    were 53% of the CPU time of a constrained top-20, and the repeated cache took 2.8 GB for 16 prompts.

    Upstream: transformers 5 models that call attention through `ALL_ATTENTION_FUNCTIONS.get_interface(
    config._attn_implementation)` (what `_can_set_attn_implementation` detects: Llama, Qwen2/3, Phi, Mistral, ...)
    take a registered function `f(module, query, key, value, attention_mask, scaling=..., **kwargs)` and pass their
    `layer_idx` on the module; the prompt's keys are read from `DynamicCache.layers[i].keys / .values`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    base = unwrap_peft(model)
    config = base.config
    layers = getattr(prompt_cache, "layers", None)
    usable = (
        type(base)._can_set_attn_implementation()
        and config._attn_implementation in ("sdpa", "eager")
        and not getattr(config.get_text_config(), "sliding_window", None)
        and bool(layers)
        and all(getattr(layer, "keys", None) is not None for layer in layers)
    )
    if not usable:
        yield None
        return
    if SHARED_PROMPT not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(SHARED_PROMPT, _shared_prompt_forward)
        AttentionMaskInterface.register(SHARED_PROMPT, sdpa_mask)  # built by the model, not read by the function
    before = config._attn_implementation
    _shared.update(keys=[layer.keys for layer in layers], values=[layer.values for layer in layers],
                   keep=keep.bool(), width=width)  # fmt: skip
    config._attn_implementation = SHARED_PROMPT
    try:
        yield _feed_rows
    finally:
        config._attn_implementation = before
        _shared.clear()


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
