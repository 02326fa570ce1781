"""SupportNet, KeyNet and an unconstrained multi-head router: networks that amortize MIPS.

For a fixed key set K the support function h(q) = max_k <q, k> is convex and
1-homogeneous, and its gradient at q is the maximising key.

- :class:`SupportNet` is an input-convex network f(q) (one output per head); the predicted
  key of head c is grad_q f_c(q). Hidden-to-hidden weights are softplus(free parameter) > 0,
  the activation is convex and non-decreasing, the query is re-injected through
  unconstrained weights, so every head is convex in q for every parameter value. With
  ``homogeneous=True`` biases are dropped and the activation is the leaky ReLU (the soft
  activation's beta -> inf limit), so f(t q) = t f(q) for t > 0 holds exactly and
  f(q) = ||q|| f(q / ||q||) = <grad f(q), q> (Euler), while staying convex.
- :class:`KeyNet` is an MLP (optional residual blocks) g(q) that outputs a key (or one
  key per head); its score is <g(q), q>.
- :class:`RouterMLP` is an unconstrained MLP with one output per IVF list (the prototype
  router of FINDINGS.md); ``predict_key`` is its input gradient (not a convex model).

All models share: ``kind``, ``n_heads``, ``config`` (a dict), ``score(q)``,
``predict_key(q)``, ``flops_per_query(with_key)``, ``n_params()``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validate import InputError, check_matrix, check_positive_int, to_tensor
from .kernels.icnn import icnn_layer, icnn_layer_ref

MODEL_KINDS = ("supportnet", "keynet", "router-mlp")


def _check_scale(x) -> float:
    x = float(x)
    if not (math.isfinite(x) and x > 0):
        raise InputError(f"input_scale: must be a positive finite number, got {x}")
    return x


def _inv_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


class _Base(nn.Module):
    kind = "base"

    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.d = check_positive_int(d, "d")
        self.n_heads = check_positive_int(n_heads, "n_heads")
        self.config: dict = {}

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def optimizer_groups(self, lr: float) -> list[dict]:
        return [{"params": list(self.parameters()), "lr": lr, "base_lr": lr}]

    def _check_queries(self, q) -> torch.Tensor:
        q = check_matrix(to_tensor(q, "queries"), "queries", dim=self.d)
        p = next(self.parameters())
        if q.device != p.device:
            raise InputError(f"queries: on {q.device}, model on {p.device}")
        if q.dtype not in (torch.float32, torch.float64):
            q = q.float()
        return q.to(p.dtype) if q.dtype != p.dtype else q

    def _squeeze(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.n_heads == 1 else x

    def _centroids_like(self, centroids, target: torch.Tensor) -> torch.Tensor:
        """``centroids`` as [n_heads, d] on ``target``'s device and dtype, or a named error."""
        c = torch.as_tensor(centroids)
        if tuple(c.shape) != tuple(target.shape):
            raise InputError(f"centroids: expected shape {tuple(target.shape)}, got {tuple(c.shape)}")
        return c.to(target)


class SupportNet(_Base):
    """Input-convex network; ``forward(q) -> [nq, n_heads]`` support values."""

    kind = "supportnet"

    def __init__(
        self,
        d: int,
        width: int = 512,
        depth: int = 3,
        n_heads: int = 1,
        *,
        inject_every: int = 1,
        homogeneous: bool = False,
        bias: bool = True,
        slope: float = 0.1,
        beta: float = 4.0,
        use_kernels: bool = True,
        input_scale: float = 1.0,
    ):
        super().__init__(d, n_heads)
        self.input_scale = _check_scale(input_scale)
        self.width = check_positive_int(width, "width")
        self.depth = check_positive_int(depth, "depth")
        self.inject_every = check_positive_int(inject_every, "inject_every")
        if not 0.0 <= slope <= 1.0:
            raise InputError(f"slope: must be in [0, 1] for a convex activation, got {slope}")
        if not beta > 0:
            raise InputError(f"beta: must be > 0, got {beta}")
        self.homogeneous = bool(homogeneous)
        self.act = "leaky" if self.homogeneous else "softleaky"
        self.slope, self.beta = float(slope), float(beta)
        self.use_kernels = bool(use_kernels)
        use_bias = bool(bias) and not self.homogeneous
        w = self.width
        self.a_in = nn.Parameter(torch.randn(w, d) / math.sqrt(d))
        self.b_in = nn.Parameter(torch.zeros(w)) if use_bias else None
        self.w_free = nn.ParameterList()
        self.a_hidden = nn.ParameterList()
        self.b_hidden = nn.ParameterList()
        self.injected = []
        for layer in range(1, self.depth):
            # positive weights with mean 1/width keep the activations' scale layer to layer
            pos = torch.rand(w, w) * (2.0 / w) + 1e-6
            self.w_free.append(nn.Parameter(_inv_softplus(pos)))
            inj = layer % self.inject_every == 0
            self.injected.append(inj)
            self.a_hidden.append(nn.Parameter(torch.randn(w, d) / math.sqrt(d) if inj else torch.zeros(0)))
            if use_bias:
                self.b_hidden.append(nn.Parameter(torch.zeros(w)))
        pos = torch.rand(n_heads, w) * (2.0 / w) + 1e-6
        self.w_out_free = nn.Parameter(_inv_softplus(pos))
        self.a_out = nn.Parameter(torch.randn(n_heads, d) * (0.1 / math.sqrt(d)))
        self.b_out = nn.Parameter(torch.zeros(n_heads)) if use_bias else None
        self.config = {
            "kind": self.kind, "d": d, "width": width, "depth": depth, "n_heads": n_heads,
            "inject_every": inject_every, "homogeneous": self.homogeneous, "bias": bool(bias),
            "slope": self.slope, "beta": self.beta, "input_scale": self.input_scale,
        }

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        layer = icnn_layer if self.use_kernels else icnn_layer_ref
        cfg = (self.act, self.slope, self.beta)
        if self.input_scale != 1.0:  # a positive scale keeps convexity and homogeneity
            q = q * self.input_scale
        z = layer(None, q, None, self.a_in, self.b_in, *cfg)
        for i in range(self.depth - 1):
            a = self.a_hidden[i] if self.injected[i] else None
            b = self.b_hidden[i] if len(self.b_hidden) else None
            z = layer(z, q if a is not None else None, self.w_free[i], a, b, *cfg)
        return layer(z, q, self.w_out_free, self.a_out, self.b_out, "none", 0.0, 1.0)

    @torch.no_grad()
    def init_from_centroids(self, centroids: torch.Tensor) -> None:
        """Start each head's linear input term at its list's centroid.

        The output layer's unconstrained input weights ``a_out`` make head h a convex
        function plus <q, a_out[h]>; starting a_out at the centroids (the input is scaled
        by ``input_scale``) makes the router start near centroid routing. Convexity and
        homogeneity are unaffected (a linear term is both)."""
        self.a_out.copy_(self._centroids_like(centroids, self.a_out) / self.input_scale)

    def optimizer_groups(self, lr: float) -> list[dict]:
        """Parameter groups: the free parameters of the positive weights learn faster.

        softplus(v) with v << 0 behaves like exp(v), so an Adam step of size lr on v changes
        the weight by a relative lr, whereas an unconstrained weight of size 1/sqrt(fan_in)
        changes by lr * sqrt(fan_in); the positive weights get that factor."""
        positive = [*self.w_free, self.w_out_free]
        ids = {id(p) for p in positive}
        rest = [p for p in self.parameters() if id(p) not in ids]
        boost = math.sqrt(self.width)
        return [{"params": rest, "lr": lr, "base_lr": lr},
                {"params": positive, "lr": lr * boost, "base_lr": lr * boost}]

    def score(self, q) -> torch.Tensor:
        q = self._check_queries(q)
        return self._squeeze(self(q))

    def predict_key(self, q, *, chunk: int = 64) -> torch.Tensor:
        """grad_q f_c(q): [nq, d] for one head, [nq, n_heads, d] for several."""
        q = self._check_queries(q)
        with torch.enable_grad():
            qq = q.detach().requires_grad_(True)
            out = self(qq)
            if self.n_heads == 1:
                (g,) = torch.autograd.grad(out.sum(), qq)
                return g.detach()
            keys = torch.empty(q.shape[0], self.n_heads, self.d, dtype=q.dtype, device=q.device)
            if self.n_heads <= 8:  # a few heads: plain backward passes beat vmap's set-up
                for c in range(self.n_heads):
                    (g,) = torch.autograd.grad(out[:, c].sum(), qq, retain_graph=True)
                    keys[:, c] = g
                return keys
            eye = torch.eye(self.n_heads, dtype=out.dtype, device=out.device)
            for c0 in range(0, self.n_heads, chunk):
                c1 = min(self.n_heads, c0 + chunk)
                cot = eye[c0:c1, None, :].expand(c1 - c0, q.shape[0], self.n_heads)
                (g,) = torch.autograd.grad(out, qq, cot, is_grads_batched=True, retain_graph=True)
                keys[:, c0:c1] = g.permute(1, 0, 2)
            return keys

    def flops_per_query(self, with_key: bool = True) -> float:
        """Forward: 2 FLOPs per weight plus ~4 per activation; the key (input gradient) costs
        one transposed GEMM per layer (2 per weight again, minus the first layer's input
        weights are still needed) plus elementwise, once per head."""
        w, d = self.width, self.d
        macs = d * w + sum((w * w + (d * w if inj else 0)) for inj in self.injected)
        macs += self.n_heads * (w + d)
        elementwise = 6 * w * self.depth
        fwd = 2.0 * macs + elementwise
        if not with_key:
            return fwd
        # input gradient: every GEMM once more (transposed), per head
        return fwd + self.n_heads * (2.0 * macs + elementwise)


class _MLPTrunk(nn.Module):
    def __init__(self, d: int, width: int, depth: int, residual: bool):
        super().__init__()
        self.inp = nn.Linear(d, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth - 1)) if residual else None
        self.residual = residual

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.inp(q))
        for i, blk in enumerate(self.blocks):
            if self.residual:
                h = h + F.gelu(blk(self.norms[i](h)))
            else:
                h = F.gelu(blk(h))
        return h

    def macs(self) -> int:
        return sum(m.weight.numel() for m in [self.inp, *self.blocks])


class KeyNet(_Base):
    """MLP that outputs a key (or one per head); score = <key, q>."""

    kind = "keynet"

    def __init__(
        self,
        d: int,
        width: int = 512,
        depth: int = 3,
        n_heads: int = 1,
        *,
        residual: bool = True,
        query_skip: bool = True,
        input_scale: float = 1.0,
    ):
        super().__init__(d, n_heads)
        self.input_scale = _check_scale(input_scale)
        self.width = check_positive_int(width, "width")
        self.depth = check_positive_int(depth, "depth")
        self.residual, self.query_skip = bool(residual), bool(query_skip)
        self.trunk = _MLPTrunk(d, width, depth, self.residual)
        self.out = nn.Linear(width, d * n_heads)
        if self.query_skip:
            # start at the raw query: relative key error 1.0 before training, then improve
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        self.config = {
            "kind": self.kind, "d": d, "width": width, "depth": depth, "n_heads": n_heads,
            "residual": self.residual, "query_skip": self.query_skip, "input_scale": self.input_scale,
        }

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """Keys [nq, n_heads, d]."""
        k = self.out(self.trunk(q * self.input_scale)).view(q.shape[0], self.n_heads, self.d)
        if self.query_skip:
            k = k + q[:, None, :]
        return k

    def predict_key(self, q) -> torch.Tensor:
        q = self._check_queries(q)
        k = self(q)
        return k[:, 0] if self.n_heads == 1 else k

    def score(self, q) -> torch.Tensor:
        q = self._check_queries(q)
        return self._squeeze(torch.einsum("nhd,nd->nh", self(q), q))

    def flops_per_query(self, with_key: bool = True) -> float:
        macs = self.trunk.macs() + self.out.weight.numel()
        # the key is the output; the score adds one d-dimensional dot per head
        return 2.0 * macs + 8.0 * self.width * self.depth + 2.0 * self.d * self.n_heads


class RouterMLP(_Base):
    """Unconstrained MLP with one support-value output per head (IVF list)."""

    kind = "router-mlp"

    def __init__(self, d: int, width: int = 256, depth: int = 2, n_heads: int = 1, *, residual: bool = False,
                 input_scale: float = 1.0, linear_heads: bool = False):
        super().__init__(d, n_heads)
        self.input_scale = _check_scale(input_scale)
        self.width = check_positive_int(width, "width")
        self.depth = check_positive_int(depth, "depth")
        self.trunk = _MLPTrunk(d, width, depth, bool(residual))
        self.out = nn.Linear(width, n_heads)
        # head h also gets <q, lin[h]>: started at list h's centroid, the router begins as
        # centroid routing and the MLP learns the correction (see init_from_centroids)
        self.lin = nn.Parameter(torch.zeros(n_heads, d)) if linear_heads else None
        self.config = {
            "kind": self.kind, "d": d, "width": width, "depth": depth, "n_heads": n_heads,
            "residual": bool(residual), "input_scale": self.input_scale, "linear_heads": bool(linear_heads),
        }

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        out = self.out(self.trunk(q * self.input_scale))
        if self.lin is not None:
            out = out + q @ self.lin.to(q.dtype).T
        return out

    @torch.no_grad()
    def init_from_centroids(self, centroids: torch.Tensor) -> None:
        """Start as centroid routing: lin = the lists' centroids, the MLP's output weights 0."""
        if self.lin is None:
            raise InputError("init_from_centroids: the router was built without linear_heads")
        self.lin.copy_(self._centroids_like(centroids, self.lin))
        self.out.weight.zero_()

    def score(self, q) -> torch.Tensor:
        q = self._check_queries(q)
        return self._squeeze(self(q))

    def predict_key(self, q, *, chunk: int = 64) -> torch.Tensor:
        return SupportNet.predict_key(self, q, chunk=chunk)

    def flops_per_query(self, with_key: bool = True) -> float:
        macs = self.trunk.macs() + self.out.weight.numel() + (self.lin.numel() if self.lin is not None else 0)
        fwd = 2.0 * macs + 8.0 * self.width * self.depth
        return fwd + (self.n_heads * (2.0 * macs) if with_key else 0.0)


def build_model(config: dict) -> _Base:
    """Model from a config dict (as written to a run folder's config.json)."""
    cfg = dict(config)
    kind = cfg.pop("kind", None)
    if kind not in MODEL_KINDS:
        raise InputError(f"model: kind must be one of {MODEL_KINDS}, got {kind!r}")
    d = cfg.pop("d")
    if kind == "supportnet":
        return SupportNet(d, **cfg)
    if kind == "keynet":
        return KeyNet(d, **cfg)
    return RouterMLP(d, **cfg)


def count_params(config: dict) -> int:
    with torch.device("meta"):
        model = build_model(config)
    return model.n_params()


def size_width(config: dict, budget: int, *, multiple: int = 16) -> int:
    """Largest width (a multiple of ``multiple``) whose parameter count fits ``budget``."""
    lo, hi = multiple, multiple
    while count_params({**config, "width": hi}) <= budget:
        lo, hi = hi, hi * 2
        if hi > 1 << 20:
            break
    if count_params({**config, "width": lo}) > budget:
        raise InputError(
            f"param_fraction: budget of {budget:,} parameters is too small for even width {multiple} "
            f"(depth {config.get('depth')}, {config.get('n_heads', 1)} heads)"
        )
    while hi - lo > multiple:
        mid = (lo + hi) // 2 // multiple * multiple
        if count_params({**config, "width": mid}) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def load_model(rundir, *, device: str | torch.device = "cpu", allow_unfinished: bool = False) -> _Base:
    """Load a trained model (EMA weights) from a run folder written by ``amips train``.

    Returns the model in eval mode; ``model.config`` holds the run's config (including
    ``partitions_sha256``, ``n_partitions`` and the input fingerprints ``inputs``). Only a
    finished run loads; ``allow_unfinished=True`` loads the latest checkpoint of an
    interrupted run, with a warning naming the step reached.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ._validate import check_device
    from .provenance import _read_json, check_run_finished

    device = check_device(device, "device")
    root = Path(rundir)
    cfg_path, weights = root / "config.json", root / "model.safetensors"
    if not root.is_dir():
        raise InputError(f"rundir: {root} is not a folder (expected a run folder from `amips train`)")
    if not cfg_path.exists() or not weights.exists():
        raise InputError(f"rundir: {root} has no config.json/model.safetensors (not a trained run?)")
    run_cfg = _read_json(cfg_path, "rundir")
    if not isinstance(run_cfg, dict) or not isinstance(run_cfg.get("model"), dict):
        raise InputError(f"rundir: {cfg_path} is not an amips run config (no 'model' entry)")
    check_run_finished(root, allow_unfinished=allow_unfinished)
    try:
        model = build_model(run_cfg["model"])
        state = load_file(str(weights), device=str(device))
        model.load_state_dict(state)
    except InputError:
        raise
    except (SafetensorError, OSError, RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise InputError(
            f"rundir: cannot load the model in {root} ({exc.__class__.__name__}: {str(exc)[:200]}); "
            "the file is truncated or corrupt: retrain, or rerun `amips train ... --resume`"
        ) from None
    model.to(device)
    model.config = {**run_cfg.get("model", {}), **{k: v for k, v in run_cfg.items() if k != "model"},
                    "rundir": str(root)}
    model.eval()
    return model
