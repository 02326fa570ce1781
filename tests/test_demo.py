"""`amips demo --quick`: the whole pipeline runs and writes its table, results and plot."""

import json

import pytest

from amips.cli import main


@pytest.fixture(autouse=True)
def torch_scan(monkeypatch):
    monkeypatch.setenv("AMIPS_BACKEND", "torch")


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--train-minutes", "0.05", "--nprobe", "1,4,45"]) == 0
    text = capsys.readouterr().out
    for step in ("[1/6]", "[2/6]", "[3/6]", "[5/6]", "[6/6]"):
        assert step in text
    assert (out / "demo.png").stat().st_size > 1000
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    routers = {r["router"] for r in rows}
    assert "centroid" in routers
    # every router is exact when it probes every list
    n_lists = res["n_lists"]
    full = [r for r in rows if r["nprobe"] == n_lists]
    assert full and all(r["match_at_1"] == 1.0 for r in full if r["router"] != "KeyNet substitution")
    assert str(out / "demo.png") in text


def test_demo_bad_data(tmp_path, capsys):
    assert main(["demo", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "data" in capsys.readouterr().err
