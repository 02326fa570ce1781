"""CPU engines (faiss over amips' lists and codes) equal the torch paths, tie-aware.

The PQ engine's contract is tested in test_cpu_pq_engine.py."""

import pytest
import torch

from amips import InputError
from amips.index import IVFIndex
from amips.index import cpu_engines as E
from amips.kernels.ivf_scan import ivf_scan_ref

pytest.importorskip("faiss")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _assert_same_topk(s_a, p_a, s_b, p_b, atol=1e-4):
    """Tie-aware: scores equal rank by rank; positions may differ only among equal scores."""
    fin = torch.isfinite(s_a)
    assert torch.equal(fin, torch.isfinite(s_b))
    torch.testing.assert_close(s_a[fin], s_b[fin], rtol=1e-5, atol=atol)
    assert torch.equal(p_a[~fin], p_b[~fin])
    for i in range(s_a.shape[0]):
        n = int(fin[i].sum())
        if n == 0:
            continue
        kth = float(s_a[i, n - 1])
        sure_a = {int(p) for p, s in zip(p_a[i, :n], s_a[i, :n]) if float(s) > kth + atol}
        sure_b = {int(p) for p, s in zip(p_b[i, :n], s_b[i, :n]) if float(s) > kth + atol}
        assert sure_a == sure_b


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    # the "torch path" compared against is the torch reference, not the Triton interpreter
    monkeypatch.setenv("AMIPS_BACKEND", "torch")


@pytest.fixture(scope="module")
def index():
    g = torch.Generator().manual_seed(1)
    n, d = 700, 24
    x = torch.randn(n, d, generator=g) * torch.exp(0.5 * torch.randn(n, 1, generator=g))
    x[11] = x[5]  # tied keys
    # very unequal lists, two of them empty
    sizes = torch.tensor([1, 0, 300, 3, 120, 0, 40, 200, 2, 34])
    part = torch.repeat_interleave(torch.arange(10), sizes)[torch.randperm(n, generator=g)]
    return IVFIndex.build(x, 10, partitions=part, pq_subspaces=12, anisotropic_threshold=0.2, seed=0)


@pytest.fixture
def engine(monkeypatch):
    def use(name):
        monkeypatch.setenv("AMIPS_CPU_ENGINE", name)
    return use


@pytest.mark.parametrize("k", [1, 7, 400])
def test_exact_engine_equals_torch_reference(index, k):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(33, index.d, generator=g)
    q[0] = index.keys_by_list[int((index.ids == 5).nonzero())] * 3  # hits the tied pair
    probes = torch.randint(0, 10, (33, 4), generator=g)
    probes[1] = torch.tensor([1, 5, -1, 1])  # only empty lists and a -1
    probes[2] = torch.tensor([2, 2, 7, -1])  # a repeated list
    eng = E.FaissExactEngine(index.keys_by_list, index.list_offsets)
    s_f, p_f = eng.search(q, probes, k)
    s_t, p_t = ivf_scan_ref(q, index.keys_by_list, index.list_offsets, E._dedupe(probes), k)
    _assert_same_topk(s_f, p_f, s_t, p_t)
    assert bool((p_f[1] == -1).all()) and bool(torch.isneginf(s_f[1]).all())


def test_index_search_default_engine_and_switches(index, engine):
    q = torch.randn(20, index.d, generator=torch.Generator().manual_seed(4))
    engine("torch")
    a = index.search(q, 3, 5)
    engine("auto")
    b = index.search(q, 3, 5)
    assert isinstance(index.exact._cpu_engine, E.FaissExactEngine)
    _assert_same_topk(b[0], b[1], a[0], a[1])
    engine("bogus")
    with pytest.raises(InputError, match="AMIPS_CPU_ENGINE"):
        index.search(q, 3, 5, scanner="pq")


def test_8bit_codes_keep_the_torch_path(engine):
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(5))
    idx = IVFIndex.build(x, 4, pq_subspaces=4, pq_bits=8, seed=0)
    engine("auto")
    assert E.pq_engine(idx.pq) is None
    s, p = idx.search(x[:5], 1, 4, scanner="pq", reorder=20)
    assert torch.equal(p[:, 0], torch.arange(5)) or bool((s[:, 0] > 0).all())
    engine("faiss")
    with pytest.raises(RuntimeError, match="4-bit"):
        E.pq_engine(idx.pq)
