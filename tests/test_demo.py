"""`amips demo`: the whole pipeline end to end (--quick), its summary, --overwrite, and the
path without matplotlib."""

import builtins
import json

import numpy as np
import pytest

from amips import InputError
from amips.cli import main
from amips.demo import embedding_like, equal_flops_summary, prepare_out, summary_lines

QUICK = ["demo", "--quick", "--train-minutes", "0.05", "--nprobe", "1,4,45", "--max-test", "120"]


@pytest.fixture(autouse=True)
def torch_scan(monkeypatch):
    monkeypatch.setenv("AMIPS_BACKEND", "torch")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One --quick run shared by the tests that only read its outputs."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo") / "out"
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        mp.setenv("AMIPS_BACKEND", "torch")
        code = main([*QUICK, "--out", str(out)])
    return code, out, buf.getvalue()


def test_demo_quick_end_to_end(quick_run):
    code, out, text = quick_run
    assert code == 0
    for step in ("[1/7]", "[2/7]", "[3/7]", "[4/7]", "[5/7]", "[6/7]", "[7/7]"):
        assert step in text
    assert (out / "demo.png").stat().st_size > 1000
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    routers = {r["router"] for r in rows}
    assert routers == {"centroid", "learned router", "KeyNet routing", "KeyNet substitution"}
    # routing with q and scanning with q is exact when every list is probed
    n_lists = res["n_lists"]
    full = [r for r in rows if r["nprobe"] == n_lists]
    assert full and all(r["match_at_1"] == 1.0 for r in full if r["router"] != "KeyNet substitution")
    # the summary printed is the one saved, and it names every non-baseline router
    summary = res["summary"]
    assert set(summary["routers"]) == routers - {"centroid"}
    for line in summary_lines(summary):
        assert line.strip() in text
    # the demo trained with its own settings: no noisy-query augmentation
    for settings in res["train_settings"].values():
        assert settings["noise_fraction"] == 0.0 and settings.get("noise_copies", 0) == 0


def test_demo_refuses_an_earlier_run_without_overwrite(quick_run, capsys):
    _, out, _ = quick_run
    before = (out / "results.json").read_bytes()
    assert main([*QUICK, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "earlier demo run" in err and len(err.strip().splitlines()) == 1
    assert (out / "results.json").read_bytes() == before  # nothing touched


def test_overwrite_removes_the_earlier_run_and_only_it(tmp_path):
    out = tmp_path / "o"
    (out / "runs" / "router-mlp-45").mkdir(parents=True)
    stale = out / "runs" / "router-mlp-45" / "model.safetensors"
    stale.write_bytes(b"stale")
    (out / "results.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="earlier demo run"):
        prepare_out(out, overwrite=False)
    assert stale.exists()
    prepare_out(out, overwrite=True)
    assert not (out / "runs").exists() and not (out / "results.json").exists()
    assert (out / "notes.txt").read_text() == "mine"
    # a folder with no demo outputs is used as it is
    prepare_out(tmp_path / "fresh", overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        prepare_out(tmp_path / "file", overwrite=True)


def test_rerun_with_overwrite_trains_afresh(tmp_path, capsys):
    """A second run with --overwrite never reuses the first run's models."""
    out = tmp_path / "o"
    assert main([*QUICK, "--no-plot", "--out", str(out)]) == 0
    run = next((out / "runs").iterdir())
    (run / "marker").write_text("from the first run")
    capsys.readouterr()
    assert main([*QUICK, "--no-plot", "--overwrite", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert not (run / "marker").exists()
    assert text.count("[4/7] trained") == 2  # both models trained again, from step 0


def test_demo_without_matplotlib_skips_the_plot(tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def blocked(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", blocked)
    out = tmp_path / "o"
    assert main([*QUICK, "--nprobe", "1,45", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    skip = [ln for ln in text.splitlines() if ln.startswith("[7/7]")]
    assert len(skip) == 1 and "matplotlib is not installed" in skip[0] and "pip install" in skip[0]
    assert not (out / "demo.png").exists()
    assert (out / "results.json").exists()


def test_demo_bad_input(tmp_path, capsys):
    assert main(["demo", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "data" in capsys.readouterr().err
    assert main(["demo", "--quick", "--train-minutes", "0", "--out", str(tmp_path / "o")]) == 2
    assert "train-minutes" in capsys.readouterr().err
    assert main(["demo", "--quick", "--nprobe", "1,x", "--out", str(tmp_path / "o")]) == 2
    assert "nprobe" in capsys.readouterr().err


# ---- the summary ----------------------------------------------------------------------
def _rows(name, points):
    return [{"router": name, "nprobe": p, "flops_per_query": f, "match_at_1": m} for p, f, m in points]


def test_equal_flops_summary_interpolates_and_says_who_loses():
    rows = (_rows("centroid", [(1, 1e5, 0.6), (2, 2e5, 0.8), (4, 4e5, 1.0)])
            + _rows("good", [(1, 1.5e5, 0.85), (2, 2.5e5, 0.95), (4, 4.5e5, 1.0)])
            + _rows("bad", [(1, 1.2e5, 0.5), (2, 2.2e5, 0.6), (4, 4.2e5, 0.7)])
            + _rows("costly", [(1, 9e5, 1.0)]))
    s = equal_flops_summary(rows, target=0.9)
    # centroid reaches .9 halfway (in log FLOPs) between 2e5 and 4e5
    assert s["flops_per_query"] == pytest.approx(np.sqrt(2e5 * 4e5))
    assert s["baseline_match_at_1"] == pytest.approx(0.9)
    good = s["routers"]["good"]
    t = (np.log(s["flops_per_query"]) - np.log(2.5e5)) / (np.log(4.5e5) - np.log(2.5e5))
    assert good["match_at_1"] == pytest.approx(0.95 + t * 0.05)
    assert good["verdict"] == "wins" and good["points"] > 0
    assert s["routers"]["bad"]["verdict"] == "loses"
    assert s["routers"]["costly"]["match_at_1"] is None and s["routers"]["costly"]["verdict"] == "loses"
    text = "\n".join(summary_lines(s))
    assert "good: match@1" in text and "it wins" in text
    assert "bad: match@1" in text and "it LOSES" in text
    assert "costly: cannot run at this budget" in text


def test_equal_flops_summary_when_the_baseline_never_reaches_the_target():
    rows = _rows("centroid", [(1, 1e5, 0.3), (2, 2e5, 0.5)]) + _rows("r", [(1, 1e5, 0.3), (2, 2e5, 0.5)])
    s = equal_flops_summary(rows, target=0.9)
    assert s["flops_per_query"] == 2e5 and s["baseline_match_at_1"] == 0.5
    assert s["routers"]["r"]["verdict"] == "ties"
    with pytest.raises(InputError, match="baseline"):
        equal_flops_summary(_rows("r", [(1, 1e5, 0.3)]))


# ---- the data -------------------------------------------------------------------------
def test_embedding_like_is_seeded_and_has_natural_norms_and_unequal_topics():
    a = embedding_like(3000, 400, 16, n_topics=30, seed=1)
    b = embedding_like(3000, 400, 16, n_topics=30, seed=1)
    c = embedding_like(3000, 400, 16, n_topics=30, seed=2)
    assert np.array_equal(a.keys, b.keys) and np.array_equal(a.queries_test, b.queries_test)
    assert not np.array_equal(a.keys, c.keys)
    assert a.keys.shape == (3000, 16) and a.keys.dtype == np.float32
    assert len(a.queries_test) == 100 and len(a.queries_train) == 300
    norms = np.linalg.norm(a.keys, axis=1)
    assert np.percentile(norms, 95) / np.percentile(norms, 5) > 1.8  # natural norms
    np.testing.assert_allclose(np.linalg.norm(a.queries_train, axis=1), 1.0, rtol=1e-5)
    # queries and keys come from different distributions: their mean directions differ
    km = a.keys.mean(0) / np.linalg.norm(a.keys.mean(0))
    qm = a.queries_train.mean(0) / np.linalg.norm(a.queries_train.mean(0))
    assert float(km @ qm) < 0.95
    for bad in (dict(n_keys=0), dict(d=2.5), dict(norm_sigma=float("nan")), dict(test_fraction=1.0),
                dict(n_queries=1)):
        kw = dict(n_keys=100, n_queries=10, d=4, n_topics=3)
        kw.update(bad)
        with pytest.raises(InputError, match=next(iter(bad))):
            embedding_like(**kw)
