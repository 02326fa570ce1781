"""SupportNet / KeyNet / RouterMLP: convexity, homogeneity, keys as gradients, sizing, errors."""

import pytest
import torch

from amips import InputError, load_model
from amips.models import KeyNet, RouterMLP, SupportNet, build_model, count_params, size_width

# tiny shapes: several intra-op threads only contend on the shared CI cores
pytestmark = pytest.mark.usefixtures("one_torch_thread")



def _scramble(model, scale=3.0, seed=0):
    """Random parameters far from the initialisation: convexity must hold for all of them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


@pytest.mark.parametrize("homogeneous", [False, True])
@pytest.mark.parametrize("inject_every", [1, 2])
def test_supportnet_convex_along_segments_every_head(homogeneous, inject_every):
    torch.manual_seed(0)
    net = SupportNet(7, width=24, depth=4, n_heads=5, homogeneous=homogeneous,
                     inject_every=inject_every).double()
    _scramble(net, scale=1.5)
    x, y = torch.randn(64, 7, dtype=torch.float64), torch.randn(64, 7, dtype=torch.float64)
    with torch.no_grad():
        fx, fy = net(x), net(y)
        for t in (0.1, 0.37, 0.5, 0.83):
            fm = net((1 - t) * x + t * y)
            gap = (1 - t) * fx + t * fy - fm  # [64, heads] must be >= 0
            assert float(gap.min()) >= -1e-9 * float(fx.abs().max() + fy.abs().max() + 1)


def test_unconstrained_router_is_not_convex_somewhere():
    # sanity check of the convexity test itself: an unconstrained MLP fails it
    torch.manual_seed(0)
    net = RouterMLP(7, width=24, depth=3, n_heads=5).double()
    _scramble(net, scale=1.5)
    x, y = torch.randn(256, 7, dtype=torch.float64), torch.randn(256, 7, dtype=torch.float64)
    with torch.no_grad():
        gap = 0.5 * net(x) + 0.5 * net(y) - net(0.5 * (x + y))
    assert float(gap.min()) < -1e-6


def test_homogeneous_supportnet_is_1_homogeneous_and_euler():
    torch.manual_seed(1)
    net = SupportNet(6, width=16, depth=3, n_heads=3, homogeneous=True).double()
    _scramble(net, scale=1.0, seed=2)
    q = torch.randn(20, 6, dtype=torch.float64)
    f = net(q)
    for c in (0.3, 1.0, 2.5, 17.0):
        torch.testing.assert_close(net(c * q), c * f)
    norms = q.norm(dim=1, keepdim=True)
    torch.testing.assert_close(net(q / norms) * norms, f)
    keys = net.predict_key(q)  # [20, 3, 6]
    torch.testing.assert_close(torch.einsum("nhd,nd->nh", keys, q), f)


@pytest.mark.parametrize("n_heads", [1, 4])
def test_predicted_key_is_gradient(n_heads):
    torch.manual_seed(0)
    net = SupportNet(5, width=12, depth=3, n_heads=n_heads).double()
    _scramble(net, scale=0.7)
    net.eval()
    q = torch.randn(6, 5, dtype=torch.float64)
    keys = net.predict_key(q, chunk=3)
    assert keys.shape == ((6, 5) if n_heads == 1 else (6, n_heads, 5))
    keys = keys.reshape(6, n_heads, 5)
    h = 1e-6
    for j in range(5):
        e = torch.zeros(5, dtype=torch.float64)
        e[j] = h
        fd = (net.score(q + e) - net.score(q - e)).reshape(6, n_heads) / (2 * h)
        torch.testing.assert_close(keys[:, :, j], fd, atol=1e-6, rtol=1e-5)


def test_triton_path_matches_torch_path_with_key_loss():
    """Whole SupportNet through the fused layers (interpreter on CPU) vs plain torch."""
    torch.manual_seed(0)
    net_k = SupportNet(9, width=20, depth=3, n_heads=2, use_kernels=True)
    net_t = SupportNet(9, width=20, depth=3, n_heads=2, use_kernels=False)
    net_t.load_state_dict(net_k.state_dict())
    q = torch.randn(11, 9)
    target = torch.randn(11, 9)
    grads = []
    for net in (net_k, net_t):
        qq = q.clone().requires_grad_()
        f = net(qq)
        (key,) = torch.autograd.grad(f[:, 1].sum(), qq, create_graph=True)
        loss = ((f - 0.5) ** 2).mean() + ((key - target) ** 2).sum(1).mean()
        grads.append([f.detach(), key.detach()] + list(torch.autograd.grad(loss, list(net.parameters()))))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_keynet_score_is_key_dot_query():
    torch.manual_seed(0)
    for heads in (1, 3):
        net = KeyNet(8, width=16, depth=3, n_heads=heads, query_skip=False).eval()
        q = torch.randn(5, 8)
        k = net.predict_key(q).reshape(5, heads, 8)
        torch.testing.assert_close(net.score(q).reshape(5, heads), torch.einsum("nhd,nd->nh", k, q))
    # with the query skip, an untrained KeyNet returns the raw query
    net = KeyNet(8, width=16, depth=2).eval()
    torch.testing.assert_close(net.predict_key(q), q)


def test_flops_and_sizing():
    sn = SupportNet(32, width=64, depth=3, n_heads=4)
    assert sn.flops_per_query(True) > sn.flops_per_query(False) >= 2 * (32 * 64 + 2 * 64 * 64)
    kn = KeyNet(32, width=64, depth=3)
    # forward ~ 2 FLOPs per weight
    assert 2 * kn.n_params() * 0.9 < kn.flops_per_query(True) < 2 * kn.n_params() * 1.2
    for kind in ("supportnet", "keynet", "router-mlp"):
        cfg = {"kind": kind, "d": 48, "depth": 3, "n_heads": 7 if kind != "keynet" else 1}
        w = size_width(cfg, 50_000)
        assert count_params({**cfg, "width": w}) <= 50_000 < count_params({**cfg, "width": w + 16})
    with pytest.raises(InputError, match="too small"):
        size_width({"kind": "keynet", "d": 48, "depth": 3, "n_heads": 1}, 100)


def test_bad_configs_and_inputs(tmp_path):
    with pytest.raises(InputError, match="slope"):
        SupportNet(4, slope=1.5)
    with pytest.raises(InputError, match="width"):
        SupportNet(4, width=0)
    with pytest.raises(InputError, match="kind"):
        build_model({"kind": "transformer", "d": 4})
    net = KeyNet(4, width=8, depth=2)
    with pytest.raises(InputError, match="dimension mismatch"):
        net.score(torch.randn(3, 5))
    with pytest.raises(InputError, match="NaN"):
        net.predict_key(torch.full((2, 4), float("nan")))
    with pytest.raises(InputError, match="floating-point"):
        net.score(torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(InputError, match="not a trained run"):
        load_model(tmp_path)


def test_optimizer_groups_and_input_scale():
    net = SupportNet(6, width=16, depth=3, n_heads=2, input_scale=2.0)
    groups = net.optimizer_groups(1e-3)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in net.parameters())  # each parameter once
    assert groups[1]["lr"] == pytest.approx(1e-3 * 4.0)  # positive weights: lr * sqrt(width)
    # the input scale is a fixed positive rescaling of q: f_s(q) = f_1(s q)
    ref = SupportNet(6, width=16, depth=3, n_heads=2)
    ref.load_state_dict(net.state_dict())
    q = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(net(q), ref(2.0 * q))
    with pytest.raises(InputError, match="input_scale"):
        KeyNet(6, input_scale=0.0)
