"""Fused ICNN layer kernels against torch autograd (fp64 oracle; Triton in the interpreter)."""

import pytest
import torch

from amips.kernels import triton_available
from amips.kernels.icnn import icnn_layer, icnn_layer_ref

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed")

# (M, K, D, N): rows fewer than a block, sizes not multiples of 16, several blocks
SHAPES = [(5, 24, 17, 19), (37, 40, 9, 33)]
LAYOUTS = [(True, True, True), (False, True, True), (True, False, False), (True, True, False)]


def _inputs(M, K, D, N, has_z, has_q, has_b, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype).requires_grad_()

    z = r(M, K) if has_z else None
    q = r(M, D) if has_q else None
    w = r(N, K, scale=0.5) if has_z else None
    a = r(N, D, scale=0.5) if has_q else None
    b = r(N) if has_b else None
    return z, q, w, a, b


def _grads(fn, z, q, w, a, b, act):
    ins = [t for t in (z, q, w, a, b) if t is not None]
    out = fn(z, q, w, a, b, act, 0.1, 2.0)
    cot = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    first = torch.autograd.grad(out, ins, cot, create_graph=True)
    # a loss on the first-order gradients (like the key loss): needs double backward
    loss = sum(((f - 0.1) ** 2).sum() for f in first)
    second = torch.autograd.grad(loss, ins, allow_unused=True)
    return out, first, second


CASES = [(SHAPES[0], lay, "softleaky") for lay in LAYOUTS] + [
    (SHAPES[1], LAYOUTS[0], "softleaky"),
    (SHAPES[1], LAYOUTS[0], "leaky"),
    (SHAPES[0], LAYOUTS[3], "none"),
]


@needs_triton
@pytest.mark.parametrize("shape,layout,act", CASES)
def test_triton_layer_matches_fp64_autograd(shape, layout, act, device):
    z, q, w, a, b = _inputs(*shape, *layout, torch.float32, device)
    out, first, second = _grads(icnn_layer, z, q, w, a, b, act)
    assert type(out.grad_fn).__name__ == "ICNNLayerFunctionBackward"  # the Triton path ran
    ref = [None if t is None else t.detach().double().requires_grad_() for t in (z, q, w, a, b)]
    out_r, first_r, second_r = _grads(icnn_layer_ref, *ref, act)
    red = max(shape[1], shape[2], shape[0], shape[3])
    tol = 2e-6 * red
    torch.testing.assert_close(out.double(), out_r, atol=tol, rtol=1e-5)
    for x, y in zip(first, first_r):
        torch.testing.assert_close(x.double(), y, atol=tol, rtol=1e-4)
    for x, y in zip(second, second_r):
        if y is None:
            assert x is None or float(x.abs().max()) == 0.0
        else:
            torch.testing.assert_close(x.double(), y, atol=10 * tol, rtol=1e-3)


def test_fp64_takes_the_reference_and_is_exact():
    z, q, w, a, b = _inputs(6, 8, 5, 7, True, True, True, torch.float64, "cpu")
    out = icnn_layer(z, q, w, a, b, "softleaky", 0.1, 2.0)
    assert out.dtype == torch.float64
    manual = 0.1 * (pre := z @ torch.nn.functional.softplus(w).T + q @ a.T + b) + 0.9 * torch.nn.functional.softplus(2 * pre) / 2
    torch.testing.assert_close(out, manual)
    assert torch.autograd.gradcheck(
        lambda zz, qq: icnn_layer(zz, qq, w, a, b, "softleaky", 0.1, 2.0), (z, q)
    )


def test_gradgradcheck_reference():
    z, q, w, a, b = _inputs(4, 5, 3, 6, True, True, True, torch.float64, "cpu", seed=3)
    assert torch.autograd.gradgradcheck(
        lambda zz, qq, ww: icnn_layer_ref(zz, qq, ww, a, b, "softleaky", 0.2, 1.5), (z, q, w)
    )


def test_bad_inputs():
    z, q, w, a, b = _inputs(4, 5, 3, 6, True, True, True, torch.float32, "cpu")
    with pytest.raises(ValueError, match="act"):
        icnn_layer(z, q, w, a, b, "relu")
    with pytest.raises(ValueError, match="z, q or both"):
        icnn_layer(None, None, None, None, b)
    with pytest.raises(ValueError, match="w_free"):
        icnn_layer(z, q, None, a, b)
    with pytest.raises(ValueError, match="a: shape"):
        icnn_layer(z, q, w, a[:, :2], b)
    with pytest.raises(ValueError, match="bias"):
        icnn_layer(z, q, w, a, b[:3])
    with pytest.raises(ValueError, match="row counts"):
        icnn_layer(z[:2], q, w, a, b)
    with pytest.raises(ValueError, match="floating-point"):
        icnn_layer(z, q.long(), w, a, b)
