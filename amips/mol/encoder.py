"""A small causal self-attention sequence encoder (the SASRec family).

Input: item sequences ``[B, T]`` of internal item indices shifted by one (0 is padding,
sequences are left-padded, the most recent item last). Output: one vector per position
``[B, T, d]``; the vector at position t summarises items 0..t (causal), so the last
position is the query representation of the user.

Layers: item embedding (``n_items + 1`` rows, row 0 the padding, also used as the item
representation of the similarity head) scaled by sqrt(d), plus a learned position
embedding counted from the end of the sequence (so the most recent item always has the
same position whatever the history length), dropout, then ``n_layers`` pre-LayerNorm
blocks (multi-head causal self-attention, GELU feed-forward), and a final LayerNorm.

Padding keys are masked; every position may attend to itself, so the all-padding rows of
short sequences stay finite (their outputs are never used).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * d, d))
        self.drop = nn.Dropout(dropout)
        self.p_attn = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.p_attn if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.ff(self.ln2(x)))


class SequenceEncoder(nn.Module):
    """Causal self-attention encoder over the last ``max_len`` items of a user."""

    def __init__(self, n_items: int, d: int = 64, n_layers: int = 2, n_heads: int = 2,
                 max_len: int = 50, dropout: float = 0.2):
        super().__init__()
        if d % n_heads:
            raise ValueError(f"d ({d}) must be a multiple of n_heads ({n_heads})")
        self.n_items, self.d, self.max_len = n_items, d, max_len
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(d, n_heads, dropout) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d)
        nn.init.normal_(self.item_emb.weight, std=d ** -0.5)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def item_repr(self) -> torch.Tensor:
        """[n_items, d]: the representation of internal items 0..n_items-1."""
        return self.item_emb.weight[1:]

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        """seqs [B, T] (0 = padding, items shifted by one, left-padded) -> [B, T, d]."""
        b, t = seqs.shape
        if t > self.max_len:
            seqs = seqs[:, -self.max_len:]
            t = self.max_len
        valid = seqs > 0
        pos = torch.arange(t - 1, -1, -1, device=seqs.device)  # 0 = most recent
        x = self.item_emb(seqs) * math.sqrt(self.d) + self.pos_emb(pos)[None]
        x = self.drop(x) * valid[..., None]
        causal = torch.ones(t, t, dtype=torch.bool, device=seqs.device).tril()
        eye = torch.eye(t, dtype=torch.bool, device=seqs.device)
        mask = (causal[None] & valid[:, None, :]) | eye[None]  # [B, T(query), T(key)]
        mask = mask[:, None]  # broadcast over heads
        for block in self.blocks:
            x = block(x, mask) * valid[..., None]
        return self.ln(x)

    def last(self, seqs: torch.Tensor) -> torch.Tensor:
        """[B, d]: the representation at the last (most recent) position."""
        return self.forward(seqs)[:, -1]


def pad_left(seqs: list, max_len: int) -> torch.Tensor:
    """Lists of internal item indices -> [B, max_len] int64, shifted by one, left-padded."""
    out = torch.zeros(len(seqs), max_len, dtype=torch.int64)
    for r, s in enumerate(seqs):
        s = s[-max_len:]
        if len(s):
            out[r, max_len - len(s):] = torch.as_tensor(s, dtype=torch.int64) + 1
    return out
