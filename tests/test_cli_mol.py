"""`amips mol train` / `amips mol eval`: end to end, resume after kill -9, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from amips.cli import main
from amips.mol.data import generate_ratings

PY = [sys.executable, "-m", "amips"]
TINY = ["--d", "16", "--layers", "1", "--heads", "2", "--max-len", "10", "--p-q", "2", "--p-x", "2",
        "--d-p", "8", "--gate-hidden", "16", "--negatives", "16", "--inbatch-negatives", "8",
        "--batch-size", "8", "--max-positions", "64"]


@pytest.fixture(scope="module")
def ratings(tmp_path_factory):
    path = tmp_path_factory.mktemp("molcli") / "ratings.csv"
    generate_ratings(path, n_users=60, n_items=50, min_len=6, max_len=16, seed=2)
    return path


@pytest.fixture(scope="module")
def trained_model(ratings):
    model = ratings.parent / "trained"
    assert main(["mol", "train", "--ratings", str(ratings), "--out", str(model), "--epochs", "1",
                 "--quiet", *TINY]) == 0
    return model


def _env():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_train_then_eval_writes_model_and_json(ratings, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["mol", "train", "--ratings", str(ratings), "--out", str(out), "--epochs", "2",
                 "--quiet", *TINY]) == 0
    text = capsys.readouterr().out
    assert "test (60 users): HR@1" in text and "params" in text
    for f in ("config.json", "model.safetensors", "interactions.safetensors", "checkpoint.safetensors",
              "metrics.json"):
        assert (out / f).exists(), f
    js = tmp_path / "e.json"
    assert main(["mol", "eval", "--model", str(out), "--ratings", str(ratings), "--json", str(js),
                 "--k", "5", "--repeats", "1"]) == 0
    text = capsys.readouterr().out
    res = json.loads(js.read_text())
    # eval on the training file reproduces the test metrics of training
    assert res["test"] == json.loads((out / "metrics.json").read_text())["test"]
    methods = {r["method"]: r for r in res["methods"]}
    assert set(methods) == {"exact", "per_embedding", "averaged", "combined", "bound"}
    assert methods["bound"]["recall"] == 1.0 and methods["bound"]["top1_found"] == 1.0
    assert all(0 <= r["recall"] <= 1 and r["ms"] > 0 for r in res["methods"])
    assert "bound" in text and "recall@k" in text


def test_resume_after_kill_gives_the_same_weights(ratings, tmp_path):
    args = ["mol", "train", "--ratings", str(ratings), "--epochs", "3", "--checkpoint-every", "3",
            "--quiet", "--similarity", "mol", *TINY]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(PY + args + ["--out", str(clean)], env=_env(), check=True, timeout=300)
    proc = subprocess.Popen(PY + args + ["--out", str(killed)], env=_env())
    deadline = time.time() + 240
    while not (killed / "checkpoint.safetensors").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists()
    rc = subprocess.run(PY + args + ["--out", str(killed), "--resume"], env=_env(), timeout=300).returncode
    assert rc == 0
    a, b = load_file(str(clean / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
    a = load_file(str(clean / "checkpoint.safetensors"))
    b = load_file(str(killed / "checkpoint.safetensors"))
    for k in a:
        assert (a[k] == b[k]).all(), k
    assert json.loads((clean / "metrics.json").read_text())["test"] == \
        json.loads((killed / "metrics.json").read_text())["test"]


def _bad(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("case, needle", [
    ("missing_columns", "ratings: "),
    ("non_numeric", "column 'movieId' must be an integer"),
    ("empty", "is empty"),
    ("short_user", "too little history"),
    ("no_file", "ratings: no such file"),
    ("bad_epochs", "epochs: must be >= 1"),
    ("bad_dropout", "dropout: must be in [0, 1)"),
    ("bad_negatives", "n-uniform: must be an integer >= 0"),
    ("bad_device", "device: cannot use"),
    ("exists", "out: "),
    ("resume_nothing", "resume: "),
    ("eval_no_model", "model: no such folder"),
    ("eval_big_k", "k: 100000 is larger than the number of items"),
    ("eval_bad_method", "methods: unknown top-k method"),
])
def test_cli_bad_input_exits_2_and_names_the_argument(ratings, trained_model, tmp_path, capsys, case,
                                                      needle):
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "config.json").write_text("{}")
    train = ["mol", "train", "--out", str(tmp_path / "o"), "--epochs", "1", "--quiet", *TINY]
    argv = {
        "missing_columns": train + ["--ratings", _bad(tmp_path, "a.csv", "userId,movieId,rating\n1,2,3\n")],
        "non_numeric": train + ["--ratings", _bad(tmp_path, "b.csv", "userId,movieId,rating,timestamp\n1,abc,3,4\n")],
        "empty": train + ["--ratings", _bad(tmp_path, "c.csv", "")],
        "short_user": train + ["--ratings", _bad(tmp_path, "d.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n")],
        "no_file": train + ["--ratings", str(tmp_path / "none.csv")],
        "bad_epochs": ["mol", "train", "--ratings", str(ratings), "--out", str(tmp_path / "o"), "--epochs", "0"],
        "bad_dropout": train + ["--ratings", str(ratings), "--dropout", "1.5"],
        "bad_negatives": train + ["--ratings", str(ratings), "--negatives", "-3"],
        "bad_device": train + ["--ratings", str(ratings), "--device", "nonsense"],
        "exists": ["mol", "train", "--ratings", str(ratings), "--out", str(trained), "--quiet"],
        "resume_nothing": train + ["--ratings", str(ratings), "--resume"],
        "eval_no_model": ["mol", "eval", "--model", str(tmp_path / "nope"), "--ratings", str(ratings)],
        "eval_big_k": None,
        "eval_bad_method": None,
    }[case]
    if argv is None:
        capsys.readouterr()
        argv = ["mol", "eval", "--model", str(trained_model), "--ratings", str(ratings), "--repeats", "1"]
        argv += ["--k", "100000"] if case == "eval_big_k" else ["--methods", "exact,fastest"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("amips mol: error: ") and needle in err[0], err


def test_eval_baselines_prints_them_beside_the_model(ratings, trained_model, tmp_path, capsys):
    js = tmp_path / "b.json"
    assert main(["mol", "eval", "--model", str(trained_model), "--ratings", str(ratings), "--baselines",
                 "--methods", "none", "--json", str(js)]) == 0
    text = capsys.readouterr().out
    for name in ("model (mol)", "popular", "item_knn", "ease", "95% bootstrap"):
        assert name in text
    res = json.loads(js.read_text())
    assert [b["name"] for b in res["baselines"]] == ["popular", "item_knn", "ease"]
    for b in res["baselines"]:
        mean, lo, hi = b["test_ci"]["hr@10"]
        assert lo <= mean <= hi and mean == b["test"]["hr@10"]
        d = b["model_minus_baseline"]["hr@10"]
        assert d[0] == pytest.approx(res["test"]["hr@10"] - b["test"]["hr@10"])


def test_cli_defaults_are_the_library_defaults():
    from amips.cli.mol import MODEL_DEFAULTS, TRAIN_DEFAULTS
    from amips.mol.recommender import DEFAULT_MODEL
    from amips.mol.training import FitConfig

    cfg = FitConfig()
    assert {k: getattr(cfg, k) for k in TRAIN_DEFAULTS} == TRAIN_DEFAULTS
    assert {k: DEFAULT_MODEL[k] for k in MODEL_DEFAULTS} == MODEL_DEFAULTS
    assert FitConfig(similarity="dot").resolved().max_positions == 0
    assert FitConfig(similarity="mol").resolved().n_uniform == 256
