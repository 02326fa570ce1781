"""A sequential recommender: a causal self-attention encoder with a learned similarity head.

The query representation is the encoder's output at the user's most recent position; the
item representation is the item embedding (shared with the encoder's input). The head
scores (query, item) pairs: ``amips.mol.MoL`` (Mixture-of-Logits) or the dot-product
baseline ``amips.mol.DotProduct`` with the same parameter budget, so the two differ only in
the similarity.

A trained model is a folder (written by :func:`amips.mol.training.fit` or ``amips mol
train``)::

    config.json                  hyper-parameters, sizes, parameter counts, data fingerprint
    model.safetensors            best weights (by validation HR@10)
    interactions.safetensors     the ratings as time-ordered sequences and the id maps
    checkpoint.safetensors       last training state (for --resume)
    metrics.json                 validation history and test metrics

:func:`load` returns a :class:`Recommender`: ``encode_users`` maps user ids as in the
ratings file to query representations (history up to the test target), and
``amips.mol.topk(model, queries, k)`` returns item ids as in the ratings file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._validate import InputError
from .data import Interactions
from .encoder import SequenceEncoder, pad_left

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INTERACTIONS = "interactions.safetensors"
CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.json"

DEFAULT_MODEL = {
    "d": 64, "n_layers": 2, "n_heads": 2, "max_len": 50, "dropout": 0.3,
    "p_q": 4, "p_x": 4, "d_p": 32, "tau": 0.05, "gating": "full", "gate_hidden": 32,
    "gate_dropout": 0.2,
}


def make_head(similarity: str, d: int, cfg: dict) -> nn.Module:
    """The similarity head on [d]-dimensional query and item representations."""
    from .similarity import DotProduct, MoL

    if similarity == "mol":
        return MoL(d, d, cfg["p_q"], cfg["p_x"], cfg["d_p"], tau=cfg["tau"], gating=cfg["gating"],
                   gate_hidden=cfg["gate_hidden"], gate_dropout=cfg["gate_dropout"])
    if similarity == "dot":
        return DotProduct(d, d, cfg["p_q"], cfg["p_x"], cfg["d_p"], tau=cfg["tau"], gating=cfg["gating"],
                          gate_hidden=cfg["gate_hidden"], gate_dropout=cfg["gate_dropout"])
    raise InputError(f"similarity: expected 'mol' or 'dot', got {similarity!r}")


def pair_scores(head, queries, items):
    """[B, dq], [B, di] -> [B]."""
    return head(queries, items, grid=False)


def grid_scores(head, queries, items):
    """[B, dq], [N, di] -> [B, N]."""
    return head(queries, items, grid=True)


class SeqRecModel(nn.Module):
    """Encoder + head: the trainable part of the recommender."""

    def __init__(self, n_items: int, similarity: str, cfg: dict):
        super().__init__()
        self.similarity = similarity
        self.encoder = SequenceEncoder(n_items, d=cfg["d"], n_layers=cfg["n_layers"],
                                       n_heads=cfg["n_heads"], max_len=cfg["max_len"],
                                       dropout=cfg["dropout"])
        self.head = make_head(similarity, cfg["d"], cfg)

    def param_counts(self) -> dict:
        enc = sum(p.numel() for p in self.encoder.parameters())
        head = sum(p.numel() for p in self.head.parameters())
        emb = self.encoder.item_emb.weight.numel()
        return {"total": enc + head, "encoder": enc, "item_embedding": emb, "head": head,
                "encoder_without_item_embedding": enc - emb}


@torch.no_grad()
def full_scores(model: SeqRecModel, queries: torch.Tensor, *, block: int = 256) -> torch.Tensor:
    """[nq, n_items] fp32 scores of every item (the head's exact grid, no cache rounding)."""
    items = model.encoder.item_repr()
    out = []
    for a in range(0, queries.shape[0], block):
        out.append(grid_scores(model.head, queries[a:a + block], items).float())
    return torch.cat(out) if out else queries.new_zeros(0, items.shape[0])


def ranking_metrics(ranks: np.ndarray) -> dict:
    """0-based ranks of the targets -> HR@1/10/50/200, NDCG@10, MRR (means over users)."""
    r = np.asarray(ranks, dtype=np.float64)
    out = {f"hr@{k}": float(np.mean(r < k)) for k in (1, 10, 50, 200)}
    out["ndcg@10"] = float(np.mean(np.where(r < 10, 1.0 / np.log2(r + 2.0), 0.0)))
    out["mrr"] = float(np.mean(1.0 / (r + 1.0)))
    out["n_users"] = int(len(r))
    return out


def rank_targets(scores: torch.Tensor, histories, targets) -> np.ndarray:
    """0-based full-catalogue rank of each row's target: ``scores`` [B, n_items] (changed in
    place), items of the row's history other than the target excluded, ties counted against
    the target (rank = number of other items scoring >= the target). The one ranking rule of
    the learned model and every baseline."""
    tgt = torch.as_tensor(np.asarray(targets), dtype=torch.int64, device=scores.device)
    for r, h in enumerate(histories):
        seen = torch.as_tensor(np.unique(np.asarray(h, dtype=np.int64)), device=scores.device)
        seen = seen[seen != tgt[r]]
        scores[r, seen] = -math.inf
    ts = scores.gather(1, tgt[:, None])
    return ((scores >= ts).sum(1) - 1).cpu().numpy()


@torch.no_grad()
def target_ranks(model: SeqRecModel, inter: Interactions, split: str, *, device="cpu",
                 batch: int = 256) -> np.ndarray:
    """Full-corpus rank of each user's ``split`` target; items in the history (other than the
    target itself) are excluded; ties count against the target (pessimistic)."""
    model.eval()
    ranks = np.empty(inter.n_users, dtype=np.int64)
    L = model.encoder.max_len
    for a in range(0, inter.n_users, batch):
        us = range(a, min(a + batch, inter.n_users))
        hist = [inter.history(u, split) for u in us]
        tgt = [inter.target(u, split) for u in us]
        q = model.encoder.last(pad_left(hist, L).to(device))
        ranks[a:a + len(hist)] = rank_targets(full_scores(model, q), hist, tgt)
    return ranks


# --- saving and loading ---------------------------------------------------------------------

def interactions_tensors(inter: Interactions) -> dict:
    return {"user_ids": torch.as_tensor(inter.user_ids), "item_ids": torch.as_tensor(inter.item_ids),
            "offsets": torch.as_tensor(inter.offsets), "items": torch.as_tensor(inter.items)}


def interactions_from_tensors(t: dict) -> Interactions:
    return Interactions(user_ids=t["user_ids"].numpy(), item_ids=t["item_ids"].numpy(),
                        offsets=t["offsets"].numpy(), items=t["items"].numpy())


def _read_config(path: Path) -> dict:
    try:
        return json.loads((path / CONFIG).read_text())
    except FileNotFoundError:
        raise InputError(f"model: {path} has no {CONFIG} (not a folder written by `amips mol train`)") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"model: {path / CONFIG} is corrupt: {exc}") from None


def _read_safetensors(file: Path, what: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.exists():
        raise InputError(f"model: {file.parent} has no {file.name} ({what}); was the training run finished?")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"model: {file} is corrupt: {exc}") from None


class Recommender:
    """A trained recommender: encode users, score items, serve ``amips.mol.topk``."""

    def __init__(self, model: SeqRecModel, inter: Interactions, config: dict, path: Path | None = None):
        self.model = model.eval()
        self.interactions = inter
        self.config = config
        self.path = path
        self._cache = None

    @property
    def similarity(self) -> str:
        return self.model.similarity

    @property
    def head(self) -> nn.Module:
        return self.model.head

    @property
    def device(self) -> torch.device:
        return self.model.encoder.item_emb.weight.device

    @property
    def item_ids(self) -> np.ndarray:
        return self.interactions.item_ids

    @property
    def user_ids(self) -> np.ndarray:
        return self.interactions.user_ids

    def to(self, device) -> Recommender:
        self.model.to(device)
        self._cache = None
        return self

    def item_repr(self) -> torch.Tensor:
        return self.model.encoder.item_repr().detach()

    @torch.no_grad()
    def encode_histories(self, histories, *, name: str = "histories") -> torch.Tensor:
        """Lists of item ids (as in the ratings file, oldest first) -> query repr [B, d]."""
        if isinstance(histories, (str, bytes)) or not hasattr(histories, "__len__") or len(histories) == 0:
            raise InputError(f"{name}: expected a non-empty list of item-id lists")
        seqs = []
        for i, h in enumerate(histories):
            if h is None or len(h) == 0:
                raise InputError(f"{name}: entry {i} is an empty history (a user with no history has no query)")
            seqs.append(self.interactions.item_index(h, name=f"{name}[{i}]"))
        return self.model.encoder.last(pad_left(seqs, self.model.encoder.max_len).to(self.device))

    @torch.no_grad()
    def encode_users(self, user_ids, *, split: str = "test") -> torch.Tensor:
        """User ids as in the ratings file -> query representations [B, d] (fp32).

        ``split="test"`` encodes each user's history up to the test target (everything but
        the last interaction); ``"validation"`` up to the validation target.
        """
        if split not in ("test", "validation"):
            raise InputError(f"split: expected 'test' or 'validation', got {split!r}")
        users = self.interactions.user_index(user_ids, name="user_ids")
        hist = [self.interactions.history(int(u), split) for u in users]
        return self.model.encoder.last(pad_left(hist, self.model.encoder.max_len).to(self.device))

    def seen_items(self, user_ids, *, split: str = "test") -> list[np.ndarray]:
        """For each user, the item ids (as in the ratings file) of its history before ``split``."""
        users = self.interactions.user_index(user_ids, name="user_ids")
        return [self.interactions.item_ids[np.unique(self.interactions.history(int(u), split))]
                for u in users]

    def item_cache(self):
        if self._cache is None:
            self._cache = self.model.head.item_cache(self.item_repr())
        return self._cache

    def topk_target(self):
        """(head, item cache, external item ids) for ``amips.mol.topk``."""
        return self.model.head, self.item_cache(), self.interactions.item_ids

    def param_counts(self) -> dict:
        return self.model.param_counts()

    def __repr__(self) -> str:
        c = self.param_counts()
        return (f"Recommender(similarity={self.similarity!r}, users={self.interactions.n_users}, "
                f"items={self.interactions.n_items}, params={c['total']:,})")


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Recommender:
    """Load a trained recommender folder (``amips mol train --out DIR``)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"model: no such folder: {p}")
    if not p.is_dir():
        raise InputError(f"model: {p} is not a folder (expected the --out folder of `amips mol train`)")
    cfg = _read_config(p)
    try:
        similarity, mcfg, n_items = cfg["similarity"], cfg["model"], int(cfg["n_items"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"model: {p / CONFIG} lacks {exc}") from None
    inter = interactions_from_tensors(_read_safetensors(p / INTERACTIONS, "the training interactions"))
    if inter.n_items != n_items:
        raise InputError(f"model: {p / INTERACTIONS} has {inter.n_items} items, config says {n_items}")
    model = SeqRecModel(n_items, similarity, mcfg)
    state = _read_safetensors(p / WEIGHTS, "the trained weights")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(f"model: {p / WEIGHTS} does not match {p / CONFIG}: {str(exc).splitlines()[0]}") from None
    return Recommender(model.to(device), inter, cfg, p)
