"""Training the sequential recommender: sampled softmax, early stopping, resumable.

Examples: every training position of every user (the items before the validation target),
cut into windows of ``max_len`` inputs from the most recent backwards; the target of each
position is the next item. The encoder runs on every position of a batch of windows; the
loss is taken on at most ``max_positions`` of them, drawn at random each step (0: all), which
bounds the cost of the MoL head (positions x negatives x L gate evaluations) per step. Loss: sampled softmax over the positive, ``n_uniform`` items
drawn uniformly from the catalogue and ``n_inbatch`` positives of other positions of the
batch, with the log expected count of each negative subtracted from its logit (the
"logQ" correction, which makes the sampled softmax estimate the full one under this mixed
proposal) and accidental hits (a negative equal to the row's positive) removed. MoL adds its
load-balancing term. AdamW, constant learning rate after a linear warm-up.

Determinism and resume: every step seeds torch's RNG (dropout, negatives) from (seed,
step), and the epoch order from (seed, epoch), so the checkpoint holds only weights,
optimizer moments and counters. Checkpoints (weights, AdamW moments, counters as JSON
metadata) are single safetensors files written atomically; a run killed at any moment and
resumed with ``resume=True`` continues from the last checkpoint and ends with the same
weights as an uninterrupted run (same device and thread count).

Early stopping: validation HR@10 (full-corpus ranking, seen items excluded) after every
epoch; the best weights go to ``model.safetensors``; training stops after ``patience``
epochs without improvement, or after ``epochs``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._io import (
    atomic_write,
    atomic_write_json,
    content_fingerprint,
    file_fingerprint,
    files_record,
)
from .._validate import InputError
from .data import Interactions, load_interactions
from .recommender import (
    CHECKPOINT,
    CONFIG,
    DEFAULT_MODEL,
    INTERACTIONS,
    METRICS,
    WEIGHTS,
    SeqRecModel,
    grid_scores,
    interactions_tensors,
    pair_scores,
    ranking_metrics,
    target_ranks,
)

#: the files of a finished run that ``metrics.json`` records (size + blake2b) and readers check
RUN_FILES = (CONFIG, WEIGHTS, INTERACTIONS)

LOSSES = ("auto", "full", "sampled")
SIMILARITY_DEFAULTS = {"dot": {"n_uniform": 512, "n_inbatch": 512, "max_positions": 0},
                       "mol": {"n_uniform": 256, "n_inbatch": 256, "max_positions": 1024}}
# "auto": the full softmax while it costs at most this many times the sampled one (the
# catalogue at most FULL_SOFTMAX_RATIO x the negatives per step). On movielens-small (9,742
# items) the sampled softmax over 1,024 negatives reached the full softmax's validation
# HR@10 per epoch at a tenth of the head's cost, so there it samples; ``loss="full"``
# (``--loss full``) forces the full softmax, a GPU's choice.
FULL_SOFTMAX_RATIO = 4


def use_full_softmax(cfg, n_items: int, n_positions: int, n_pairs: int) -> bool:
    if cfg.loss != "auto":
        return cfg.loss == "full"
    return n_items <= FULL_SOFTMAX_RATIO * (cfg.n_uniform + cfg.n_inbatch)


@dataclass
class FitConfig:
    similarity: str = "mol"
    epochs: int = 40
    patience: int = 8
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-3
    warmup: int = 20
    loss: str = "auto"
    # None: the head's default (SIMILARITY_DEFAULTS): MoL's gate runs on every (position,
    # negative) pair, so it takes fewer of both per step than the dot product
    n_uniform: int | None = None
    n_inbatch: int | None = None
    max_positions: int | None = None
    load_balancing: float = 1e-3
    clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 200
    model: dict = field(default_factory=lambda: dict(DEFAULT_MODEL))

    def resolved(self) -> FitConfig:
        """A copy with the head's defaults filled in where a field is None."""
        d = SIMILARITY_DEFAULTS.get(self.similarity, {})
        out = FitConfig(**{**asdict(self), "model": dict(self.model)})
        for name, value in d.items():
            if getattr(out, name) is None:
                setattr(out, name, value)
        return out

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise InputError(f"loss: expected one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.similarity not in ("mol", "dot"):
            raise InputError(f"similarity: expected 'mol' or 'dot', got {self.similarity!r}")
        for name in ("epochs", "batch_size", "patience", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name.replace('_', '-')}: must be an integer >= 1, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InputError(f"seed: must be an integer >= 0, got {self.seed!r}")
        for name in ("n_uniform", "n_inbatch", "warmup", "max_positions"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise InputError(f"{name.replace('_', '-')}: must be an integer >= 0, got {v!r}")
        for name in ("lr", "weight_decay", "load_balancing", "clip"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (name == "lr" and v == 0):
                raise InputError(f"{name.replace('_', '-')}: must be a finite number >= 0 (lr > 0), got {v!r}")
        m = self.model
        for name in ("d", "n_layers", "n_heads", "max_len", "p_q", "p_x", "d_p", "gate_hidden"):
            v = m.get(name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name.replace('_', '-')}: must be an integer >= 1, got {v!r}")
        if m["d"] % m["n_heads"]:
            raise InputError(f"d: must be a multiple of n-heads ({m['n_heads']}), got {m['d']}")
        if not (0 < m["tau"] and math.isfinite(m["tau"])):
            raise InputError(f"tau: must be a positive number, got {m['tau']!r}")


def training_windows(inter: Interactions, max_len: int) -> np.ndarray:
    """[n_windows, max_len + 1] internal item indices + 1 (0 = padding), left-padded.

    Each user's training sequence (all but the last two items) is cut from the end into
    windows of ``max_len + 1`` items overlapping by one, so every training transition
    appears exactly once as (input position, next item).
    """
    rows = []
    for u in range(inter.n_users):
        s = inter.history(u, "train") + 1
        end = len(s)
        while end >= 2:
            start = max(0, end - (max_len + 1))
            w = np.zeros(max_len + 1, dtype=np.int64)
            w[max_len + 1 - (end - start):] = s[start:end]
            rows.append(w)
            end = start + 1
    if not rows:
        raise InputError("ratings: no user has a training transition (every user needs >= 4 interactions "
                         "for the model to learn anything)")
    return np.stack(rows)


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 17) % (2**63 - 1)


def sampled_softmax_loss(model: SeqRecModel, hidden: torch.Tensor, targets: torch.Tensor,
                         log_q_inbatch: torch.Tensor, cfg: FitConfig, gen: torch.Generator) -> torch.Tensor:
    """hidden [P, d] query reprs, targets [P] internal item indices (0-based)."""
    n_items = model.encoder.n_items
    items = model.encoder.item_repr()
    dev = hidden.device
    negs, logq = [], []
    if cfg.n_uniform:
        u = torch.randint(0, n_items, (cfg.n_uniform,), generator=gen).to(dev)
        negs.append(u)
    if cfg.n_inbatch and targets.numel() > 1:
        m = min(cfg.n_inbatch, targets.numel())
        pick = torch.randperm(targets.numel(), generator=gen)[:m].to(dev)
        negs.append(targets[pick])
    neg = torch.cat(negs)
    # expected count of item j among the negatives: uniform share + in-batch share
    m_in = min(cfg.n_inbatch, targets.numel()) if targets.numel() > 1 else 0
    q_neg = cfg.n_uniform / n_items + m_in * log_q_inbatch[neg].exp()
    logq = q_neg.log()
    lb = cfg.similarity == "mol" and cfg.load_balancing > 0
    if lb:
        pos, gates = model.head(hidden, items[targets], grid=False, return_gates=True)
    else:
        pos = pair_scores(model.head, hidden, items[targets])  # [P]
    grid = grid_scores(model.head, hidden, items[neg])  # [P, R]
    grid = grid - logq[None]
    grid = grid.masked_fill(neg[None] == targets[:, None], -math.inf)
    logits = torch.cat([pos[:, None], grid], 1).float()
    loss = F.cross_entropy(logits, torch.zeros(len(pos), dtype=torch.int64, device=dev))
    if lb:
        loss = loss + cfg.load_balancing * model.head.load_balancing_loss(gates)
    return loss


def full_softmax_loss(model: SeqRecModel, hidden: torch.Tensor, targets: torch.Tensor,
                      cfg: FitConfig) -> torch.Tensor:
    """Cross-entropy of the next item against the whole catalogue: hidden [P, d], targets [P]."""
    items = model.encoder.item_repr()
    logits = grid_scores(model.head, hidden, items).float()  # [P, N]
    loss = F.cross_entropy(logits, targets)
    if cfg.similarity == "mol" and cfg.load_balancing > 0:
        _, gates = model.head(hidden, items[targets], grid=False, return_gates=True)
        loss = loss + cfg.load_balancing * model.head.load_balancing_loss(gates)
    return loss


def _save_state(path: Path, model, opt, meta: dict) -> None:
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"optim.{i}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().contiguous().cpu()
    data = save(tensors, metadata={"meta": json.dumps(meta)})
    atomic_write(path, lambda fh: fh.write(data))


def _load_state(path: Path, model, opt) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    dev = model.encoder.item_emb.weight.device
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    sd = opt.state_dict()
    state = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v if name == "step" else v.to(dev)
    sd["state"] = state
    opt.load_state_dict(sd)
    return meta


def _save_weights(path: Path, model) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()})
    atomic_write(path, lambda fh: fh.write(data))


def fit(ratings, out, cfg: FitConfig | None = None, *, device: str = "cpu", resume: bool = False,
        overwrite: bool = False, progress: bool = True, drop_short: bool = False,
        max_minutes: float | None = None) -> dict:
    """Train on a ratings CSV, write the model folder ``out``; returns the metrics dict."""
    from safetensors.torch import save
    from tqdm.auto import tqdm

    cfg = (cfg or FitConfig()).resolved()
    cfg.check()
    out = Path(out)
    if resume and overwrite:
        raise InputError("resume: --resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise InputError(f"out: {out} exists and is not a folder")
    has_run = out.is_dir() and any((out / f).exists() for f in (CONFIG, CHECKPOINT, WEIGHTS))
    if has_run and not (resume or overwrite):
        raise InputError(f"out: {out} already holds a training run; pass --resume to continue it "
                         "or --overwrite to start again")
    if resume and not (out / CONFIG).exists():
        raise InputError(f"resume: {out} holds no training run to resume (no {CONFIG})")
    if overwrite and out.is_dir():
        for f in (CONFIG, CHECKPOINT, WEIGHTS, INTERACTIONS, METRICS):
            (out / f).unlink(missing_ok=True)
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as exc:
        raise InputError(f"device: cannot use {device!r}: {str(exc).splitlines()[0]}") from None

    inter = load_interactions(ratings, drop_short=drop_short)
    fingerprint = file_fingerprint(ratings)
    run_cfg = {"similarity": cfg.similarity, "fit": {k: v for k, v in asdict(cfg).items() if k != "model"},
               "model": cfg.model, "n_items": inter.n_items, "n_users": inter.n_users,
               "n_interactions": inter.n_interactions, "drop_short": drop_short,
               "ratings": fingerprint, "ratings_content": content_fingerprint(ratings)}
    if resume:
        old = json.loads((out / CONFIG).read_text())
        # epochs and patience may change on resume (extend or cut a run): neither enters the
        # per-step computation, so the steps both runs share stay identical.
        for part in (old, run_cfg):
            part["fit"] = {k: v for k, v in part["fit"].items() if k not in ("epochs", "patience")}
        for key in ("similarity", "fit", "model", "n_items", "n_users", "n_interactions"):
            if old.get(key) != run_cfg[key]:
                raise InputError(f"resume: the run in {out} was started with a different {key} "
                                 f"({old.get(key)!r} != {run_cfg[key]!r}); use --overwrite or another --out")
        if old["ratings"]["size"] != fingerprint["size"] or \
                old["ratings"]["sha256_head_tail"] != fingerprint["sha256_head_tail"]:
            raise InputError(f"ratings: differs from the file the run in {out} was started on")
        run_cfg = json.loads((out / CONFIG).read_text())

    torch.manual_seed(cfg.seed)
    model = SeqRecModel(inter.n_items, cfg.similarity, cfg.model).to(dev)
    counts = model.param_counts()
    run_cfg["n_params"] = counts
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    windows = torch.as_tensor(training_windows(inter, cfg.model["max_len"]))
    n_win = windows.shape[0]
    steps_per_epoch = math.ceil(n_win / cfg.batch_size)
    # empirical target frequency for the logQ correction of in-batch negatives
    tgt_all = windows[:, 1:][windows[:, 1:] > 0] - 1
    freq = torch.bincount(tgt_all, minlength=inter.n_items).double()
    log_freq = (freq / freq.sum()).clamp_min(1e-12).log().to(dev)

    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_hr10": -1.0, "best_epoch": -1,
             "bad_epochs": 0, "done": False, "history": [], "train_seconds": 0.0}
    if resume and (out / CHECKPOINT).exists():
        try:
            state = _load_state(out / CHECKPOINT, model, opt)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors/torch raise several kinds for a torn file
            raise InputError(f"resume: {out / CHECKPOINT} is truncated or corrupt ({exc.__class__.__name__}: "
                             f"{str(exc)[:120]}); start again with --overwrite") from None
        # a finished run continues when resumed with more --epochs or a larger --patience
        state["done"] = state["bad_epochs"] >= cfg.patience or state["epoch"] >= cfg.epochs
        if not state["done"]:
            # the run is unfinished again until it ends: its metrics.json says it is finished
            (out / METRICS).unlink(missing_ok=True)
    if not resume or not (out / INTERACTIONS).exists():
        out.mkdir(parents=True, exist_ok=True)
        data = save({k: v.contiguous() for k, v in interactions_tensors(inter).items()})
        atomic_write(out / INTERACTIONS, lambda fh: fh.write(data))
    if not resume:
        atomic_write_json(out / CONFIG, run_cfg)

    t_start = time.perf_counter()
    t_before = state["train_seconds"]
    bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=state["epoch"] * steps_per_epoch + state["step_in_epoch"],
               desc=f"mol train ({cfg.similarity})", disable=not progress, unit="step")
    gen = torch.Generator()
    stop_time = None if max_minutes is None else t_start + 60 * max_minutes

    def checkpoint():
        state["train_seconds"] = t_before + time.perf_counter() - t_start
        _save_state(out / CHECKPOINT, model, opt, state)

    while not state["done"] and state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        gen.manual_seed(_step_seed(cfg.seed, -1 - epoch))
        order = torch.randperm(n_win, generator=gen)
        model.train()
        for s in range(state["step_in_epoch"], steps_per_epoch):
            step = state["global_step"]
            torch.manual_seed(_step_seed(cfg.seed, step))
            gen.manual_seed(_step_seed(cfg.seed, step))
            batch = windows[order[s * cfg.batch_size:(s + 1) * cfg.batch_size]].to(dev)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            hidden = model.encoder(inputs)
            valid = (targets > 0) & (inputs > 0)
            hid, tgt = hidden[valid], targets[valid] - 1
            if cfg.max_positions and tgt.numel() > cfg.max_positions:
                pick = torch.randperm(tgt.numel(), generator=gen)[:cfg.max_positions].to(dev)
                hid, tgt = hid[pick], tgt[pick]
            if use_full_softmax(cfg, inter.n_items, tgt.numel(), model.head.n_pairs):
                loss = full_softmax_loss(model, hid, tgt, cfg)
            else:
                loss = sampled_softmax_loss(model, hid, tgt, log_freq, cfg, gen)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            state["global_step"] = step + 1
            state["step_in_epoch"] = s + 1
            state.setdefault("last_losses", [])
            state["last_losses"] = (state["last_losses"] + [loss.item()])[-steps_per_epoch:]
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", best_hr10=f"{max(state['best_hr10'], 0):.4f}")
            if state["global_step"] % cfg.checkpoint_every == 0 and s + 1 < steps_per_epoch:
                checkpoint()
            if stop_time is not None and time.perf_counter() > stop_time:
                checkpoint()
                bar.close()
                return {"stopped": "max_minutes", **state}
        val = ranking_metrics(target_ranks(model, inter, "validation", device=dev))
        mean_loss = float(np.mean(state["last_losses"])) if state["last_losses"] else float("nan")
        state["history"].append({"epoch": epoch + 1, "train_loss": mean_loss, **val})
        if val["hr@10"] > state["best_hr10"]:
            state["best_hr10"], state["best_epoch"], state["bad_epochs"] = val["hr@10"], epoch + 1, 0
            _save_weights(out / WEIGHTS, model)
        else:
            state["bad_epochs"] += 1
            if state["bad_epochs"] >= cfg.patience:
                state["done"] = True
        state["epoch"], state["step_in_epoch"] = epoch + 1, 0
        if progress:
            bar.write(f"epoch {epoch + 1}: loss {mean_loss:.4f}  val HR@10 {val['hr@10']:.4f}  "
                      f"NDCG@10 {val['ndcg@10']:.4f}  (best {state['best_hr10']:.4f} @ {state['best_epoch']})")
        checkpoint()
    bar.close()
    state["done"] = True
    checkpoint()

    from .recommender import load

    best = load(out, device=dev)
    test_ranks = target_ranks(best.model, inter, "test", device=dev)
    test = ranking_metrics(test_ranks)
    val = ranking_metrics(target_ranks(best.model, inter, "validation", device=dev))
    metrics = {"similarity": cfg.similarity, "seed": cfg.seed, "best_epoch": state["best_epoch"],
               "epochs_run": state["epoch"], "train_seconds": state["train_seconds"],
               "n_params": counts, "validation": val, "test": test, "history": state["history"],
               "test_ranks": test_ranks.tolist(), "finished": True, "files": files_record(out, RUN_FILES)}
    atomic_write_json(out / METRICS, metrics)
    return metrics
