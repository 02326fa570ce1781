"""CPU engines (faiss over amips' lists and codes) equal the torch paths, tie-aware.

The PQ engine's contract is tested in test_cpu_pq_engine.py."""

import pytest
import torch
from _topk import assert_same_topk

from amips import InputError
from amips.index import IVFIndex
from amips.index import cpu_engines as E
from amips.kernels.ivf_scan import ivf_scan_ref

pytest.importorskip("faiss")
pytestmark = pytest.mark.usefixtures("one_torch_thread", "torch_backend")


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
    assert_same_topk(s_f, p_f, s_t, p_t)
    assert bool((p_f[1] == -1).all()) and bool(torch.isneginf(s_f[1]).all())


def test_index_search_default_engine_and_switches(index, engine):
    q = torch.randn(20, index.d, generator=torch.Generator().manual_seed(4))
    engine("torch")
    a = index.search(q, 3, 5)
    engine("auto")
    b = index.search(q, 3, 5)  # 20 queries x 5 probes over 10 lists: >= 8 per list, batched
    assert isinstance(index.exact._cpu_engines["batched"], E.BatchedExactEngine)
    assert_same_topk(b[0], b[1], a[0], a[1])
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


# --- the batched list-major exact engine ------------------------------------------------


def _oracle(q, keys, offsets, probes, k):
    """fp64 scores; candidates = keys of the distinct valid lists; (score desc, position asc)."""
    sc = q.double() @ keys.double().T
    out_s = torch.full((q.shape[0], k), float("-inf"), dtype=torch.float64)
    out_p = torch.full((q.shape[0], k), -1, dtype=torch.int64)
    for i, row in enumerate(probes.tolist()):
        pos = sorted({p for lst in set(row) if lst >= 0 for p in range(int(offsets[lst]), int(offsets[lst + 1]))})
        ranked = sorted(pos, key=lambda p: (-float(sc[i, p]), p))[:k]
        out_s[i, :len(ranked)] = sc[i, ranked]
        out_p[i, :len(ranked)] = torch.tensor(ranked, dtype=torch.int64)
    return out_s, out_p


@pytest.fixture(scope="module")
def integer_lists():
    """Small-integer keys and queries: every product is exact in fp32, so ties are exact
    whatever the summation order and the tie rule (lowest position) decides the answer."""
    g = torch.Generator().manual_seed(7)
    sizes = torch.tensor([0, 1, 90, 3, 40, 0, 17, 64, 2, 25, 130])
    n, d = int(sizes.sum()), 12
    keys = torch.randint(-2, 3, (n, d), generator=g).float()
    keys[100:120] = keys[5]  # a run of duplicates across lists 2-4
    keys[300:310] = keys[200]
    offsets = torch.zeros(sizes.numel() + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(sizes, 0)
    q = torch.randint(-2, 3, (60, d), generator=g).float()
    q[:4] = keys[5]  # queries whose best keys are tied duplicates
    return keys, offsets, q


@pytest.mark.parametrize("k", [1, 2, 10, 64, 70, 400])
@pytest.mark.parametrize("nprobe", [2, 6])
def test_batched_engine_equals_oracle_with_ties(integer_lists, k, nprobe, monkeypatch):
    keys, offsets, q = integer_lists
    g = torch.Generator().manual_seed(k * 10 + nprobe)
    n_lists = offsets.numel() - 1
    probes = torch.randint(-1, n_lists, (q.shape[0], nprobe), generator=g)
    probes[0] = torch.tensor([2, 2, 4, 3, 2, 9])[:nprobe]  # repeated lists
    probes[1] = torch.tensor([0, 5, -1, 0, 5, -1])[:nprobe]  # only empty lists and -1
    probes[2] = torch.tensor([1, 8, 3, 1, 8, 3])[:nprobe]  # fewer keys than k
    monkeypatch.setattr(E.BatchedExactEngine, "MAX_BLOCK", 200)  # long lists split by queries
    s, p = E.BatchedExactEngine(keys, offsets).search(q, probes, k)
    s_o, p_o = _oracle(q, keys, offsets, probes, k)
    assert torch.equal(p, p_o)
    assert torch.equal(s.double(), s_o)
    s_r, p_r = ivf_scan_ref(q, keys, offsets, E._dedupe(probes), k)
    assert torch.equal(p, p_r)


@pytest.mark.parametrize("k", [1, 5, 100])
def test_batched_engine_on_real_valued_keys(index, k):
    g = torch.Generator().manual_seed(9)
    q = torch.randn(50, index.d, generator=g) * 3
    probes = torch.randint(0, 10, (50, 5), generator=g)
    s, p = E.BatchedExactEngine(index.keys_by_list, index.list_offsets).search(q, probes, k)
    s_o, p_o = _oracle(q, index.keys_by_list, index.list_offsets, probes, k)
    assert_same_topk(s, p, s_o.float(), p_o)
    # fp16 storage: products of the stored (rounded) keys, upcast one list at a time
    half = index.keys_by_list.half()
    s_h, p_h = E.BatchedExactEngine(half, index.list_offsets).search(q, probes, k)
    s_ho, p_ho = _oracle(q, half.float(), index.list_offsets, probes, k)
    assert_same_topk(s_h, p_h, s_ho.float(), p_ho)


def test_exact_engine_choice_rule(index, engine):
    engine("auto")
    kind = E.exact_engine_kind
    assert kind(80, 1, 10) == "batched" and kind(79, 1, 10) == "faiss"
    assert kind(1, 8, 548) == "faiss" and kind(3000, 32, 548) == "batched"
    assert kind(548, 8, 548) == "batched" and kind(547, 8, 548) == "faiss"
    assert kind(1, 8, 548, key_dtype=torch.float16) == "batched"  # faiss would copy fp16 keys
    assert kind(1, 8, 548, faiss_available=False) == "batched"
    for forced in ("torch", "faiss", "batched"):
        engine(forced)
        assert kind(1, 1, 10) == forced and kind(10**6, 64, 10) == forced
    engine("auto")
    assert isinstance(E.exact_engine(index.exact, 2, 3), E.FaissExactEngine)
    assert isinstance(E.exact_engine(index.exact, 200, 3), E.BatchedExactEngine)
    assert E.exact_engine(index.exact, 200, 3) is E.exact_engine(index.exact, 300, 4)  # built once
    engine("torch")
    assert E.exact_engine(index.exact, 200, 3) is None
    # one query or a batch, through index.search: the same answers
    engine("auto")
    q = torch.randn(40, index.d, generator=torch.Generator().manual_seed(11))
    batch = index.search(q, 4, 3)
    single = [index.search(q[i:i + 1], 4, 3) for i in range(q.shape[0])]
    assert_same_topk(batch[0], batch[1], torch.cat([a for a, _ in single]), torch.cat([b for _, b in single]))
