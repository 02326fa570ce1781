"""amips.eval and the `amips index` / `amips eval` commands (index build, PQ, JSON, errors)."""

import json

import numpy as np
import pytest
import torch
from _cli import build_index_and_router

import amips
from amips import InputError, IVFIndex
from amips.cli import main
from amips.eval import evaluate, format_table, parse_nprobes, plot_results


@pytest.fixture(autouse=True)
def torch_scan(monkeypatch):
    monkeypatch.setenv("AMIPS_BACKEND", "torch")  # the interpreter is tested elsewhere


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    ds = amips.synthetic(2000, 250, 16, n_clusters=8, cluster_spread=1.0, seed=5)
    np.save(root / "keys.npy", ds.keys)
    np.save(root / "queries.npy", ds.queries_test)
    return root, ds


def test_evaluate_rows_are_monotone_and_exact_at_full_probe(files):
    _, ds = files
    index = IVFIndex.build(ds.keys, 10, seed=0)
    rows = evaluate(index, ds.queries_test, nprobes=[1, 3, 10], repeats=1, qps_single=5)
    assert [r["nprobe"] for r in rows] == [1, 3, 10]
    m = [r["match_at_1"] for r in rows]
    assert m == sorted(m) and m[-1] == 1.0 and rows[-1]["recall_at_10"] == 1.0
    f = [r["flops_per_query"] for r in rows]
    assert f == sorted(f)
    # full probe = centroid scores + every key once
    assert f[-1] == pytest.approx(2 * 10 * 16 + 2 * 16 * 2000)
    assert all(r["qps"] > 0 and r["qps_single"] > 0 for r in rows)
    assert "match@1" in format_table(rows)


def test_plot_writes_png(files, tmp_path):
    _, ds = files
    index = IVFIndex.build(ds.keys, 10, seed=0)
    rows = evaluate(index, ds.queries_test[:50], nprobes=[1, 2], repeats=1, qps_single=0)
    path = plot_results(rows, tmp_path / "p.png", title="t")
    assert (tmp_path / "p.png").stat().st_size > 1000 and path.endswith("p.png")


def test_parse_nprobes():
    assert parse_nprobes("4,1,2,2") == [1, 2, 4]
    with pytest.raises(InputError, match="out of range"):
        parse_nprobes("1,99", 10)
    with pytest.raises(InputError, match="integers"):
        parse_nprobes("1,x")


def test_cli_build_and_eval(files, tmp_path, capsys):
    root, ds = files
    out = tmp_path / "ix"
    assert main(["index", "build", "--keys", str(root / "keys.npy"), "--n-lists", "12",
                 "--out", str(out), "--quiet"]) == 0
    for name in ("index.json", "partitions.npy", "centroids.npy", "lists.safetensors"):
        assert (out / name).exists()
    part = np.load(out / "partitions.npy")
    assert part.dtype == np.int64 and part.shape == (2000,) and part.max() == 11
    # rebuilding without --force is refused
    assert main(["index", "build", "--keys", str(root / "keys.npy"), "--n-lists", "12",
                 "--out", str(out)]) == 2
    js = tmp_path / "r.json"
    assert main(["eval", "--index", str(out), "--queries", str(root / "queries.npy"),
                 "--nprobe", "1,2,12", "--json", str(js), "--repeats", "1", "--single", "3"]) == 0
    res = json.loads(js.read_text())
    rows = res["results"]
    assert [r["nprobe"] for r in rows] == [1, 2, 12]
    for r in rows:
        for key in ("match_at_1", "recall_at_10", "flops_per_query", "qps"):
            assert key in r
    assert rows[-1]["match_at_1"] == 1.0
    assert "centroid" in capsys.readouterr().out


def test_cli_errors(files, tmp_path, capsys):
    root, _ = files
    out = tmp_path / "ix"
    main(["index", "build", "--keys", str(root / "keys.npy"), "--n-lists", "6", "--out", str(out), "--quiet"])
    capsys.readouterr()
    cases = [
        (["eval", "--index", str(out), "--queries", str(root / "queries.npy"), "--nprobe", "7"], "nprobe"),
        (["eval", "--index", str(tmp_path / "nope"), "--queries", str(root / "queries.npy")], "index"),
        (["eval", "--index", str(out), "--queries", str(root / "queries.npy"), "--router", "keynet"], "run folder"),
        (["eval", "--index", str(out), "--queries", str(root / "queries.npy"), "--router", "foo:bar"], "unknown kind"),
        (["eval", "--index", str(out), "--queries", str(root / "queries.npy"), "--scanner", "pq"], "PQ"),
        (["index", "build", "--keys", str(root / "keys.npy"), "--n-lists", "0", "--out", str(tmp_path / "b")], "n-lists"),
    ]
    wrong_d = tmp_path / "q8.npy"
    np.save(wrong_d, np.ones((3, 8), np.float32))
    cases.append((["eval", "--index", str(out), "--queries", str(wrong_d)], "queries"))
    for argv, needle in cases:
        assert main(argv) == 2, argv
        assert needle in capsys.readouterr().err


def test_pq_scanner_integration(files, tmp_path):
    pytest.importorskip("amips.index.pq_scanner")
    _, ds = files
    index = IVFIndex.build(ds.keys, 8, seed=0, pq_subspaces=8, pq_bits=4, pq_iters=4)
    q = torch.from_numpy(ds.queries_test)
    exact_s, exact_i = index.search(q, 5, 8)
    # reorder over every candidate = exact scan of the probed lists
    s, i, info = index.search(q, 5, 8, scanner="pq", reorder=2000, return_info=True)
    assert torch.allclose(s, exact_s, atol=1e-4)
    assert info.scanner == "pq" and info.flops_per_query > 0
    path = index.save(tmp_path / "pq")
    loaded = IVFIndex.load(path)
    a = index.search(q, 5, 2, scanner="pq")
    b = loaded.search(q, 5, 2, scanner="pq")
    assert torch.equal(a[1], b[1])


def test_cli_eval_bf16_router(tmp_path, capsys):
    """`amips eval --router router:RUN --router-dtype bf16` scores lists with a bf16 copy of
    the model; the row says so and its match@1 sits near the fp32 router's."""
    rng = np.random.default_rng(7)
    np.save(tmp_path / "k.npy", rng.standard_normal((400, 8)).astype(np.float32))
    np.save(tmp_path / "q.npy", rng.standard_normal((64, 8)).astype(np.float32))
    build_index_and_router(tmp_path, 6, steps=20, batch_size=32, width=16)
    rows = {}
    for dtype in ("fp32", "bf16"):
        js = tmp_path / f"{dtype}.json"
        assert main(["eval", "--index", str(tmp_path / "ix"), "--queries", str(tmp_path / "q.npy"),
                     "--router", f"router:{tmp_path / 'run'}", "--router", "centroid", "--router-dtype", dtype,
                     "--nprobe", "1,6", "--repeats", "0", "--single", "0", "--json", str(js)]) == 0
        rows[dtype] = json.loads(js.read_text())["results"]
    labels = [r["router"] for r in rows["bf16"]]
    assert "router (bf16)" in labels and "centroid" in labels  # centroid routing stays fp32
    by = {d: {(r["router"].split(" ")[0], r["nprobe"]): r["match_at_1"] for r in rows[d]} for d in rows}
    assert by["bf16"][("router", 6)] == 1.0
    assert abs(by["bf16"][("router", 1)] - by["fp32"][("router", 1)]) <= 0.1
    assert by["bf16"][("centroid", 1)] == by["fp32"][("centroid", 1)]
    assert main(["eval", "--index", str(tmp_path / "ix"), "--queries", str(tmp_path / "q.npy"),
                 "--router-dtype", "fp16"]) == 2
    assert "router-dtype" in capsys.readouterr().err
