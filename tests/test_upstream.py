"""One test per workaround in `rlrec.upstream`: each checks that our code does what it should AND that the
upstream behaviour it works around is still there. When TRL, PEFT or transformers change that behaviour, a test
here fails and names the workaround to revisit, instead of a stage silently training or measuring something else."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os

import peft
import pytest
import torch
import trl
from datasets import Dataset
from transformers import DynamicCache, TrainingArguments
from transformers.integrations.integration_utils import TensorBoardCallback
from trl.trainer.utils import add_fused_lm_head

from rlrec.models import build_for_training
from rlrec.schema import LoraConfig, ModelConfig
from rlrec.training.arguments import lora_config
from rlrec.upstream import (
    copy_reference_tokens,
    generation_model,
    has_token_adapters,
    log_metric,
    preference_trainer,
    reference_logps,
    reorder_generated_cache,
    shared_prompt_attention,
    shared_prompt_logps,
    shuffle_whole_groups,
    tensorboard_dir,
    unfuse_lm_head,
    unfuse_sft_head,
    unwrap_peft,
)

IDENTIFIERS = {"i1": "<a_1><b_2>", "i2": "<a_1><b_3>", "i3": "<a_2><b_2>"}
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def tiny_model():
    return build_for_training(ModelConfig(hidden_size=32, layers=1, heads=2), IDENTIFIERS,
                              ["the user liked these items"], seed=0)  # fmt: skip


def labelled_batch(vocabulary: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocabulary, (3, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    return ids, labels


def with_token_adapter(model, token_ids):
    """The model under a LoRA adapter whose identifier rows are trainable (and moved away from their init)."""
    wrapped = peft.get_peft_model(model, lora_config(LoraConfig(r=4, alpha=8), model, token_ids,
                                                     "trainable_token_indices"))  # fmt: skip
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "trainable_tokens_delta" in name:
                param.normal_(0, 1.0)
    return wrapped


# --- unfuse_lm_head ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [None, 0.5], ids=["unscaled", "cohere-logit-scale"])
def test_unfused_head_matches_trl_fused_head(scale):
    """Our plain head returns TRL's numbers, every field, with the model's logit scale read as TRL reads it."""
    model, tokenizer, _ = tiny_model()
    if scale is not None:
        model.config.logit_scale = scale
    fused, plain = copy.deepcopy(model), copy.deepcopy(model)
    add_fused_lm_head(fused, temperature=0.7, outputs=OUTPUTS)
    unfuse_lm_head(plain, temperature=0.7)
    ids, labels = labelled_batch(len(tokenizer))
    a = fused(input_ids=ids, labels=labels, fused_lm_head=True)
    b = plain(input_ids=ids, labels=labels, fused_lm_head=True)
    for field in ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert torch.allclose(getattr(a, field), getattr(b, field), atol=1e-5), field
    assert torch.equal(a.is_top1, b.is_top1) and torch.equal(a.label_mask, b.label_mask)
    assert torch.equal(plain(input_ids=ids).logits, model(input_ids=ids).logits)  # generation path untouched


def test_unfused_head_label_smoothing_is_transformers_label_smoother():
    """`label_smoothing` in the plain head gives the loss transformers' `LabelSmoother` computes from the full logits
    (the path TRL's SFT takes for `label_smoothing_factor`, with a second forward), and the same gradients."""
    from transformers.trainer_pt_utils import LabelSmoother

    model, tokenizer, _ = tiny_model()
    plain = copy.deepcopy(model)
    unfuse_lm_head(plain, label_smoothing=0.1)
    ids, labels = labelled_batch(len(tokenizer))
    scored = (labels[:, 1:] != -100).sum()
    ours = -plain(input_ids=ids, labels=labels, fused_lm_head=True).log_probs.sum() / scored
    theirs = LabelSmoother(epsilon=0.1)(model(input_ids=ids), labels, shift_labels=True)
    assert torch.allclose(ours, theirs, atol=1e-5)
    ours.backward(), theirs.backward()
    grads = [(a.grad, b.grad) for a, b in zip(plain.parameters(), model.parameters(), strict=True)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in grads)
    unsmoothed = copy.deepcopy(model)
    unfuse_lm_head(unsmoothed)
    assert not torch.allclose(
        ours, -unsmoothed(input_ids=ids, labels=labels, fused_lm_head=True).log_probs.sum() / scored
    )


def test_trl_fused_head_still_misses_peft_token_adapters():
    """Upstream behaviour behind `unfuse_lm_head`: TRL's fused head reads the output layer's weight directly, so under
    PEFT's trainable-token adapter it fails or scores with the untrained rows. If this test fails, TRL handles the
    wrapper now: `unfuse_lm_head` and `wants_plain_lm_head`'s adapter rule may be dropped."""
    model, tokenizer, token_ids = tiny_model()
    wrapped = with_token_adapter(model, token_ids)
    assert has_token_adapters(wrapped)
    ids, labels = labelled_batch(len(tokenizer))
    with torch.no_grad():
        truth = torch.log_softmax(wrapped(input_ids=ids).logits[:, :-1].float(), dim=-1)
        truth = truth.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels[:, 1:] != -100)
        fused = copy.deepcopy(wrapped)
        add_fused_lm_head(unwrap_peft(fused))
        try:
            missed = not torch.allclose(fused(input_ids=ids, labels=labels, fused_lm_head=True).log_probs, truth,
                                        atol=1e-4)  # fmt: skip
        except AttributeError:  # the wrapper has no `bias`
            missed = True
        assert missed, "TRL's fused head now sees PEFT token adapters: revisit rlrec.upstream.unfuse_lm_head"
        plain = copy.deepcopy(wrapped)
        unfuse_lm_head(unwrap_peft(plain))
        assert torch.allclose(plain(input_ids=ids, labels=labels, fused_lm_head=True).log_probs, truth, atol=1e-5)


def test_trl_sft_still_smooths_through_its_label_smoother_and_the_plain_head_takes_over(tmp_path):
    """Upstream behaviour behind `unfuse_sft_head`: TRL's SFTTrainer with `label_smoothing_factor` sets
    `trainer.label_smoother` and smooths the full logits with it. Our plain head smooths on the labelled positions
    instead, so the trainer's smoother must be off, or the loss would be smoothed twice from logits never made."""
    model, tokenizer, _ = tiny_model()
    args = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], max_steps=1,
                         label_smoothing_factor=0.1, per_device_train_batch_size=2)  # fmt: skip
    rows = Dataset.from_dict({"text": ["the user liked these items"] * 4})
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    assert trainer.label_smoother is not None, "TRL no longer smooths through label_smoother: see unfuse_sft_head"
    unfuse_sft_head(trainer, 0.1)
    assert trainer.label_smoother is None
    ids, labels = labelled_batch(len(tokenizer))
    smoothed = trainer.model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
    plain = copy.deepcopy(model)
    unfuse_lm_head(plain)
    assert not torch.allclose(smoothed, plain(input_ids=ids, labels=labels, fused_lm_head=True).log_probs)


# --- DPOTrainer: the reference adapter, the private hooks, the metrics ---------------------------------------------


def dpo_trainer(tmp_path, model, tokenizer, loss=None, ref_model=None):
    trie_ids = [tokenizer.convert_tokens_to_ids(["<a_1>", "<b_2>"]) + [tokenizer.eos_token_id]]
    rows = Dataset.from_dict(
        {
            "prompt_ids": [[5, 6, 7]] * 4,
            "chosen_ids": trie_ids * 4,
            "rejected_ids": [list(reversed(trie_ids[0][:2])) + [tokenizer.eos_token_id]] * 4,
        }
    )
    args = trl.DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], max_length=None,
                         per_device_train_batch_size=2, max_steps=1, logging_steps=1)  # fmt: skip
    return preference_trainer(loss, model=model, ref_model=ref_model, args=args, train_dataset=rows,
                              processing_class=tokenizer)  # fmt: skip


def test_trl_reference_adapter_still_skips_token_rows_and_we_copy_them(tmp_path):
    """Upstream behaviour behind `copy_reference_tokens`: TRL copies the "default" adapter into "ref" by names that
    contain `.default.`, which PEFT's `trainable_tokens_delta.default` does not. If the first assertion fails, TRL
    copies them now and `copy_reference_tokens` may be dropped."""
    model, tokenizer, token_ids = tiny_model()
    trainer = dpo_trainer(tmp_path, with_token_adapter(model, token_ids), tokenizer)
    params = dict(trainer.model.named_parameters())
    pairs = [
        (name, name[: -len(".default")] + ".ref") for name in params if name.endswith("trainable_tokens_delta.default")
    ]
    assert pairs and all(ref in params for _, ref in pairs)
    assert not all(torch.equal(params[d], params[r]) for d, r in pairs), "TRL copies token rows: see upstream.py"
    assert copy_reference_tokens(trainer.model) == len(pairs)
    assert all(torch.equal(params[d], params[r]) for d, r in pairs)


def test_dpo_private_hooks_keep_their_signatures(tmp_path):
    """`preference_trainer` overrides DPOTrainer's private `_prepare_dataset` and `_compute_loss`; if TRL renames or
    re-signs them, the override would silently stop being called."""
    expected = {"_prepare_dataset": ["self", "dataset", "processing_class", "args", "dataset_name"],
                "_compute_loss": ["self", "model", "inputs", "return_outputs"]}  # fmt: skip
    for name, parameters in expected.items():
        assert list(inspect.signature(getattr(trl.DPOTrainer, name)).parameters) == parameters, name
    calls = []

    def loss(trainer, model, inputs):
        calls.append(sorted(inputs))
        value = model(input_ids=inputs["input_ids"]).logits.mean()
        log_metric(trainer, "probe/value", 2.0)
        log_metric(trainer, "probe/value", 4.0)
        return value, None

    model, tokenizer, _ = tiny_model()
    trainer = dpo_trainer(tmp_path, model, tokenizer, loss, ref_model=copy.deepcopy(model).requires_grad_(False))
    assert "prompt_ids" in trainer.train_dataset.column_names  # `_prepare_dataset` passed the rows through
    trainer.train()
    assert calls and "input_ids" in calls[0]  # `_compute_loss` called our hook
    logged = [row for row in trainer.state.log_history if "probe/value" in row]
    assert logged and logged[0]["probe/value"] == 3.0  # `log_metric`: the mean of the step's values


def test_reference_logps_are_the_reference_models_row_sums_in_order(tmp_path):
    """Upstream behaviour behind `reference_logps`: TRL's `compute_ref_log_probs` returns the per-row completion sums
    as two `chunk(2)` halves; concatenated they are every row in order, also for an odd number of rows (S-DPO lays
    out K + 1 rows per prompt)."""
    model, tokenizer, _ = tiny_model()
    reference = copy.deepcopy(model).requires_grad_(False)
    trainer = dpo_trainer(tmp_path, model, tokenizer, ref_model=reference)
    ids = torch.randint(3, len(tokenizer), (3, 7), generator=torch.Generator().manual_seed(1))
    completion = torch.zeros_like(ids)
    completion[:, 4:] = 1
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion}
    with torch.no_grad():
        logprobs = torch.log_softmax(reference(input_ids=ids).logits[:, :-1].float(), dim=-1)
        per_token = logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) * completion[:, 1:]
    assert torch.allclose(reference_logps(trainer, inputs), per_token.sum(1), atol=1e-5)


def test_generation_model_is_the_unwrapped_trainer_model(tmp_path):
    """`generation_model` goes through TRL's `unwrap_model_for_generation`; on one process it yields the trainer's
    own model, which generates."""
    model, tokenizer, _ = tiny_model()
    trainer = dpo_trainer(tmp_path, model, tokenizer, ref_model=copy.deepcopy(model).requires_grad_(False))
    with generation_model(trainer) as unwrapped:
        assert unwrapped is trainer.accelerator.unwrap_model(trainer.model_wrapped)
        out = unwrapped.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 5)


# --- transformers -----------------------------------------------------------------------------------------------------


def test_partial_cache_reorder_equals_the_full_one():
    """`reorder_generated_cache` moves only the generated positions; it relies on DynamicCache's `layers[i].keys`
    and equals the full `reorder_cache` when the prompt positions are the same for every beam (as in our search)."""
    model, tokenizer, _ = tiny_model()
    prompt = torch.randint(0, len(tokenizer), (1, 6), generator=torch.Generator().manual_seed(1))
    beams = 3
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True).past_key_values
        cache.batch_repeat_interleave(beams)
        step = torch.randint(0, len(tokenizer), (beams, 2), generator=torch.Generator().manual_seed(2))
        cache = model(input_ids=step, past_key_values=cache, use_cache=True).past_key_values
    assert all(getattr(layer, "keys", None) is not None for layer in cache.layers), "DynamicCache changed"
    full, partial = copy.deepcopy(cache), copy.deepcopy(cache)
    parents = torch.tensor([2, 0, 0])
    full.reorder_cache(parents)
    reorder_generated_cache(partial, parents, generated=2)
    for a, b in zip(full.layers, partial.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_shared_prompt_attention_equals_attention_over_the_repeated_prompt():
    """`shared_prompt_attention` relies on transformers calling a registered attention function per layer with
    `module.layer_idx`, and on DynamicCache's `layers[i].keys`. One step of two beams on a left-padded prompt: the
    logits equal those of the same step over the prompt's cache repeated to both beams; the model's attention
    implementation is restored afterwards; a cache without per-layer keys is declined (None)."""
    model, tokenizer, _ = tiny_model()
    model.eval()
    assert type(model)._can_set_attn_implementation(), "transformers no longer dispatches Llama's attention"
    prompt = torch.randint(3, len(tokenizer), (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # the second prompt is shorter: left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    step = torch.randint(3, len(tokenizer), (4, 1), generator=torch.Generator().manual_seed(2))
    next_position = positions[:, -1:].repeat_interleave(2, dim=0) + 1
    with torch.no_grad():
        cache = model(input_ids=prompt, attention_mask=mask, position_ids=positions, use_cache=True).past_key_values
        repeated = copy.deepcopy(cache)
        repeated.batch_repeat_interleave(2)
        expected = model(
            input_ids=step,
            attention_mask=torch.cat([mask.repeat_interleave(2, 0), torch.ones(4, 1, dtype=mask.dtype)], 1),
            position_ids=next_position,
            past_key_values=repeated,
        ).logits
        with shared_prompt_attention(model, cache, mask, width=2) as feed:
            assert feed is not None and model.config._attn_implementation == "rlrec_shared_prompt"
            feed(torch.arange(4))
            got = model(input_ids=step, position_ids=next_position, past_key_values=DynamicCache()).logits
    assert model.config._attn_implementation == "sdpa"
    assert torch.allclose(got, expected, atol=1e-5)
    with shared_prompt_attention(model, object(), mask, width=2) as feed:
        assert feed is None


def test_shared_prompt_logps_equal_full_forwards_and_trl_still_asks_for_them():
    """`grpo_trainer` overrides TRL's `_get_per_token_logps_and_entropies`: its signature is still the one the
    override takes, and `shared_prompt_logps` (each distinct prompt once, its cache repeated to its rows) gives the
    log-probabilities, entropies and gradients of a forward of every full row: two groups of three completions
    with left-padded prompts of different lengths and right-padded completions."""
    parameters = list(inspect.signature(trl.GRPOTrainer._get_per_token_logps_and_entropies).parameters)
    assert parameters[:8] == ["self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size",
                              "compute_entropy", "compute_aux_loss"]  # fmt: skip
    model, tokenizer, _ = tiny_model()
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, len(tokenizer), (n,), generator=generator) for n in (5, 7)]
    rows, masks = [], []
    for prompt in prompts:
        for length in (2, 3, 1):
            completion = torch.randint(3, len(tokenizer), (length,), generator=generator)
            row = torch.full((7 + 3,), tokenizer.pad_token_id)
            row[7 - len(prompt) : 7], row[7 : 7 + length] = prompt, completion
            mask = torch.zeros(10, dtype=torch.long)
            mask[7 - len(prompt) : 7 + length] = 1
            rows.append(row)
            masks.append(mask)
    ids, mask = torch.stack(rows), torch.stack(masks)
    logps, entropy = shared_prompt_logps(model, ids, mask, 3, temperature=0.7, entropy=True)
    shared_grad = torch.autograd.grad((logps * mask[:, -3:]).sum(), model.get_input_embeddings().weight)[0]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -4:-1].float() / 0.7
    full = torch.log_softmax(logits, -1)
    expected = full.gather(-1, ids[:, -3:].unsqueeze(-1)).squeeze(-1)
    full_grad = torch.autograd.grad((expected * mask[:, -3:]).sum(), model.get_input_embeddings().weight)[0]
    real = mask[:, -3:].bool()  # padding after a completion is masked out of every loss
    assert torch.allclose(logps[real], expected[real], atol=1e-5)
    assert torch.allclose(entropy[real], -(full.exp() * full).sum(-1)[real], atol=1e-5)
    assert torch.allclose(shared_grad, full_grad, atol=1e-5)


def test_a_step_is_shuffled_by_whole_groups():
    """TRL 1.16's `_prepare_inputs` shuffles a step's completions with the `shuffle_sequence_dict` of its module before
    splitting them into micro-batches; `grpo_trainer` swaps in `shuffle_whole_groups`, which keeps each prompt's G
    completions together, and every column (tensors, lists, scalars) in step."""
    assert "shuffle_sequence_dict(generation_batch)" in inspect.getsource(trl.GRPOTrainer._prepare_inputs)
    prompts = torch.arange(4).repeat_interleave(3)  # 4 groups of G = 3, consecutive as TRL's sampler lays them out
    batch = {
        "prompt_ids": prompts[:, None].repeat(1, 5),
        "advantages": prompts.float() * 10,
        "item": [f"i{p}" for p in prompts.tolist()],
        "num_items_in_batch": torch.tensor(12),
        "old": None,
    }
    torch.manual_seed(0)
    shuffled = shuffle_whole_groups(batch, 3)
    order = shuffled["prompt_ids"][:, 0].tolist()
    assert sorted(order) == prompts.tolist() and order != prompts.tolist()
    assert all(len(set(order[g : g + 3])) == 1 for g in range(0, 12, 3))  # each micro-batch of 3: one prompt
    assert shuffled["advantages"].tolist() == [p * 10.0 for p in order] and shuffled["item"] == [f"i{p}" for p in order]
    assert shuffled["num_items_in_batch"].item() == 12 and shuffled["old"] is None


def test_tensorboard_folder_is_read_from_the_environment_per_trainer(tmp_path, monkeypatch):
    """transformers 5 has no `logging_dir` argument; its TensorBoard callback reads TENSORBOARD_LOGGING_DIR when it
    is built. `tensorboard_dir` sets it around one construction and restores the environment after."""
    assert "logging_dir" not in {f.name for f in dataclasses.fields(TrainingArguments)}
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "/somewhere/else")
    with tensorboard_dir(tmp_path / "round-1" / "logs"):
        first = TensorBoardCallback()
    with tensorboard_dir(tmp_path / "round-2" / "logs"):
        second = TensorBoardCallback()
    assert first.logging_dir == str(tmp_path / "round-1" / "logs")
    assert second.logging_dir == str(tmp_path / "round-2" / "logs")  # each trainer its own folder
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == "/somewhere/else"
