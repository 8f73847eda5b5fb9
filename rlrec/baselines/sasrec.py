"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018) in plain torch.

    h_0 = E[items] * sqrt(d) + P[positions]   (left-padded to max_len, item 0 = padding)
    h_l = block_l(h_{l-1}),  block = pre-LN causal self-attention + pre-LN point-wise FFN, residuals, dropout
    score(u, i) = LN(h_L)[last] . E[i]        (the item embedding is the output layer too)
Losses: `ce` (default), full-softmax cross-entropy over the whole catalogue at every position, or `bce`, the
paper's binary cross-entropy with `negatives` uniformly sampled negatives per position. Training runs epoch by
epoch until valid NDCG@10 has not improved for `patience` epochs (or `max_epochs`), and the best epoch's weights
are kept: early stopping, not a time budget.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlrec.schema import SASRecConfig


class Block(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden)
        self.attn = nn.MultiheadAttention(config.hidden, config.heads, dropout=config.dropout, batch_first=True)
        self.ffn_norm = nn.LayerNorm(config.hidden)
        self.ffn = nn.Sequential(
            nn.Linear(config.hidden, config.hidden), nn.ReLU(), nn.Dropout(config.dropout),
            nn.Linear(config.hidden, config.hidden), nn.Dropout(config.dropout),
        )  # fmt: skip
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, h: torch.Tensor, causal: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        q = self.attn_norm(h)
        attended, _ = self.attn(q, q, q, attn_mask=causal, key_padding_mask=padding, need_weights=False)
        h = h + self.dropout(attended)
        h = h + self.ffn(self.ffn_norm(h))
        return h.masked_fill(padding.unsqueeze(-1), 0.0)


class SASRec(nn.Module):
    def __init__(self, num_items: int, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        self.items = nn.Embedding(num_items + 1, config.hidden, padding_idx=0)
        self.positions = nn.Embedding(config.max_len, config.hidden)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.blocks))
        self.norm = nn.LayerNorm(config.hidden)
        nn.init.normal_(self.items.weight, std=config.hidden**-0.5)
        with torch.no_grad():
            self.items.weight[0].zero_()

    def hidden_states(self, seq: torch.Tensor) -> torch.Tensor:
        """seq [B, L] left-padded item indices (0 = pad) -> hidden states [B, L, d]."""
        length = seq.shape[1]
        padding = seq == 0
        h = self.items(seq) * self.config.hidden**0.5 + self.positions(torch.arange(length, device=seq.device))
        h = self.dropout(h).masked_fill(padding.unsqueeze(-1), 0.0)
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).triu(1)
        # A fully padded row would give NaN attention; let every position see itself at least.
        padding_keys = padding & ~torch.eye(length, dtype=torch.bool, device=seq.device)[-1]
        for block in self.blocks:
            h = block(h, causal, padding_keys)
        return self.norm(h)

    def scores(self, seq: torch.Tensor) -> torch.Tensor:
        """Scores of every real item (indices 1..N -> columns 0..N-1) after each sequence."""
        return self.hidden_states(seq)[:, -1] @ self.items.weight[1:].T

    def loss(self, seq: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """seq, targets [B, L]: targets[t] is the item after seq[..t]; 0 where there is none."""
        h = self.hidden_states(seq)
        mask = targets > 0
        h, pos = h[mask], targets[mask]
        if self.config.loss == "ce":
            return F.cross_entropy(h @ self.items.weight[1:].T, pos - 1, label_smoothing=self.config.label_smoothing)
        neg = torch.randint(1, self.items.num_embeddings, (len(pos), self.config.negatives), device=seq.device)
        pos_logit = (h * self.items(pos)).sum(-1)
        neg_logit = (h.unsqueeze(1) * self.items(neg)).sum(-1)
        return F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit)) + \
            F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit))  # fmt: skip
