"""Softmax DPO over several negatives (S-DPO, Chen et al. 2024, "On Softmax Direct Preference Optimization for
Recommendation") on TRL's `DPOTrainer`.

    loss = -log sigmoid( -log sum_j exp( beta * (r_neg_j - r_pos) ) ),   r = log pi(item | prompt) - log pi_ref(...)

With one negative this is DPO's sigmoid loss, -log sigmoid(beta * (r_pos - r_neg)).

TRL's DPO is pairwise: its collator lays a batch out as [chosen; rejected] and its loss splits it in two. We keep
everything else of `DPOTrainer` (reference handling, including PEFT's adapter-disabled or copied "ref" adapter and
a separate reference model; the optimiser, logging, checkpoints) and replace two pieces:
- `MultiNegativeCollator` lays a batch of B prompts with K negatives out as [chosen (B); negative 1 (B); ...;
  negative K (B)], one padded row per (prompt, item) pair;
- `sdpo_step` scores those rows with the policy and the reference (TRL's own reference pass, through
  `upstream.reference_logps`), then applies `sdpo_loss`; it is the loss hook of `rlrec.upstream.preference_trainer`.
  Pairwise DPO goes through TRL's loss untouched.
Both losses read rows already tokenised from the catalogue trie (`prompt_ids`, `chosen_ids`, `rejected_ids`), so a
completion is exactly the token sequence constrained decoding produces for that item.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlrec.errors import RlrecError
from rlrec.upstream import LossHook, log_metric, reference_logps


def sdpo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-prompt S-DPO loss. `chosen_logratios` [B], `rejected_logratios` [B, K] (log pi - log pi_ref)."""
    margins = beta * (rejected_logratios - chosen_logratios.unsqueeze(-1))
    return -F.logsigmoid(-torch.logsumexp(margins, dim=-1))


@dataclass
class MultiNegativeCollator:
    """Rows {prompt_ids, chosen_ids, rejected_ids: K lists} -> input_ids / attention_mask / completion_mask for
    (K + 1) * B right-padded sequences: all chosen first, then each negative position in turn."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        k = len(examples[0]["rejected_ids"])
        if any(len(e["rejected_ids"]) != k for e in examples):
            raise RlrecError("S-DPO batch: every prompt needs the same number of negatives")
        pairs = [(e["prompt_ids"], e["chosen_ids"]) for e in examples]
        for j in range(k):
            pairs += [(e["prompt_ids"], e["rejected_ids"][j]) for e in examples]
        width = max(len(p) + len(c) for p, c in pairs)
        input_ids = torch.full((len(pairs), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)
        completion_mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for row, (prompt, completion) in enumerate(pairs):
            n = len(prompt) + len(completion)
            input_ids[row, :n] = torch.tensor(prompt + completion, dtype=torch.long)
            attention_mask[row, :n] = 1
            completion_mask[row, len(prompt) : n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def sdpo_step(num_negatives: int, sft_weight: float) -> LossHook:
    """The S-DPO loss hook for `preference_trainer`; `sft_weight` adds the target's NLL per token (RPO), as TRL's
    `sft` loss type does for pairwise DPO."""

    def step(trainer, model, inputs: dict):
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
                        labels=labels, fused_lm_head=True)  # fmt: skip
        logps = outputs.log_probs.sum(dim=1)
        ref_logps = reference_logps(trainer, inputs)
        ratios = (logps - ref_logps).view(num_negatives + 1, -1)  # [K + 1, B]
        chosen, rejected = ratios[0], ratios[1:].T
        loss = sdpo_loss(chosen, rejected, trainer.beta).mean()
        gather = trainer.accelerator.gather
        if sft_weight:  # the target's NLL per token, as TRL's `sft` loss type computes it for pairwise DPO
            batch = chosen.size(0)
            nll = -outputs.log_probs[:batch].sum() / inputs["completion_mask"][:batch].sum()
            loss = loss + sft_weight * nll
            log_metric(trainer, "sft/nll_chosen", gather(nll.detach()).mean().item())

        # TRL's DPO log keys, with the K negatives of a prompt pooled
        chosen_rewards, rejected_rewards = trainer.beta * chosen.detach(), trainer.beta * rejected.detach()
        by_row = logps.detach().view(num_negatives + 1, -1)
        beats_all = (chosen_rewards.unsqueeze(1) > rejected_rewards).all(dim=1).float()
        log_metric(trainer, "rewards/chosen", gather(chosen_rewards).mean().item())
        log_metric(trainer, "rewards/rejected", gather(rejected_rewards).mean().item())
        log_metric(trainer, "rewards/accuracies", gather(beats_all).mean().item())
        margins = chosen_rewards - rejected_rewards.max(dim=1).values
        log_metric(trainer, "rewards/margins", gather(margins).mean().item())
        log_metric(trainer, "logps/chosen", gather(by_row[0]).mean().item())
        log_metric(trainer, "logps/rejected", gather(by_row[1:].reshape(-1)).mean().item())
        return loss, outputs

    return step
