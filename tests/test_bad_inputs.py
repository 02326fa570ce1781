"""The bad-input table: every subcommand and public entry point against bad inputs.

Each CLI case runs in-process (``amips.cli.main``) and must exit 2 with ONE line
``amips <cmd>: error: ...`` naming the argument, no traceback, and no complete-looking
output left behind. Each API case must raise :class:`amips.InputError` naming the argument.
A few cases run as subprocesses to prove no traceback reaches a user, and the kill tests
kill a job (SIGKILL, at a fault-injection point) while it writes its final outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import build_index_and_router

import amips
from amips import InputError
from amips.cli import main

REPO = Path(__file__).resolve().parents[1]
N_KEYS, N_Q, D, N_LISTS = 240, 40, 8, 4


# --------------------------------------------------------------------------------------
# fixtures: small files, and complete artifacts built once
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((N_KEYS, D)).astype(np.float32)
    queries = rng.standard_normal((N_Q, D)).astype(np.float32)
    f = {}

    def save(name, arr):
        np.save(root / name, arr)
        f[name.removesuffix(".npy")] = str(root / name)

    save("keys.npy", keys)
    save("queries.npy", queries)
    save("other_keys.npy", rng.standard_normal((N_KEYS, D)).astype(np.float32))
    save("other_queries.npy", rng.standard_normal((N_Q, D)).astype(np.float32))
    save("partitions.npy", (np.arange(N_KEYS) % N_LISTS).astype(np.int64))
    save("other_partitions.npy", rng.permutation(np.arange(N_KEYS) % N_LISTS).astype(np.int64))
    save("short_partitions.npy", np.zeros(N_KEYS - 3, np.int64))
    save("nan.npy", np.where(np.eye(N_Q, D) > 0, np.nan, queries).astype(np.float32))
    save("inf.npy", np.where(np.eye(N_Q, D) > 0, np.inf, queries).astype(np.float32))
    save("wrong_d.npy", rng.standard_normal((N_Q, D + 1)).astype(np.float32))
    save("one_d.npy", queries[0])
    save("three_d.npy", queries.reshape(N_Q, 2, D // 2))
    save("empty.npy", np.zeros((0, D), np.float32))
    save("huge_keys.npy", keys * np.float32(1e20))
    save("huge_queries.npy", queries * np.float32(1e20))
    (root / "zero.npy").write_bytes(b"")
    f["zero"] = str(root / "zero.npy")
    raw = (root / "keys.npy").read_bytes()
    (root / "truncated.npy").write_bytes(raw[: len(raw) // 2])
    f["truncated"] = str(root / "truncated.npy")
    f["missing"] = str(root / "no_such_file.npy")
    (root / "a_file").write_text("x")
    f["a_file"] = str(root / "a_file")
    (root / "ratings_nocol.csv").write_text("userId,movieId,rating\n1,2,3\n")
    f["ratings_nocol"] = str(root / "ratings_nocol.csv")
    (root / "ratings_nonnum.csv").write_text("userId,movieId,rating,timestamp\n1,a,3,4\n")
    f["ratings_nonnum"] = str(root / "ratings_nonnum.csv")

    # complete artifacts
    assert main(["labels", "--keys", f["keys"], "--queries", f["queries"], "--partitions",
                 f["partitions"], "--out", str(root / "labels"), "--quiet"]) == 0
    assert main(["labels", "--keys", f["keys"], "--queries", f["queries"],
                 "--out", str(root / "labels_nopart"), "--quiet"]) == 0
    assert main(["index", "build", "--keys", f["keys"], "--n-lists", str(N_LISTS),
                 "--out", str(root / "index"), "--quiet"]) == 0
    common = ["--steps", "3", "--batch-size", "16", "--noise", "0", "--eval-every", "3",
              "--val-fraction", "0.25", "--device", "cpu", "--quiet", "--width", "8", "--depth", "1"]
    assert main(["train", "--keys", f["keys"], "--queries", f["queries"], "--model", "keynet",
                 "--out", str(root / "run"), *common]) == 0
    assert main(["train", "--keys", f["other_keys"], "--queries", f["queries"], "--model", "keynet",
                 "--out", str(root / "run_other_keys"), *common]) == 0
    shutil.copytree(root / "run", root / "run_unfinished")
    (root / "run_unfinished" / "state.json").unlink()  # as a run killed before it finished
    # an index build killed after its k-means (the stage file marks it unfinished)
    shutil.copytree(root / "index", root / "index_unfinished")
    (root / "index_unfinished" / "index.json").unlink()
    (root / "index_unfinished" / ".kmeans-stage.json").write_text("{}")
    (root / "not_labels").mkdir()
    (root / "existing.faiss").write_bytes(b"old")
    (root / "existing.json").write_text("{}")
    f["root"] = root
    return f


def _one_line_error(capsys, rc, cmd: str, name: str):
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"amips {cmd}: error: "), err
    assert name in lines[0], f"{name!r} not named in: {lines[0]}"


# --------------------------------------------------------------------------------------
# the CLI table: (id, argv with {placeholders}, error prefix, argument named)
# --------------------------------------------------------------------------------------
LABELS = ["labels", "--quiet", "--out", "{tmp}/out"]
BUILD = ["index", "build", "--quiet", "--n-lists", "4", "--out", "{tmp}/out"]
TRAIN = ["train", "--model", "keynet", "--out", "{tmp}/out", "--quiet", "--device", "cpu", "--steps", "2",
         "--batch-size", "8", "--noise", "0"]
TUNE = ["tune", "--out", "{tmp}/out", "--budget", "0.1", "--no-progress"]
EVAL = ["eval", "--index", "{root}/index", "--repeats", "0", "--single", "0", "--max-queries", "2"]

CLI_CASES = [
    # labels
    ("labels-keys-0byte", LABELS + ["--keys", "{zero}", "--queries", "{queries}"], "labels", "keys"),
    ("labels-keys-truncated", LABELS + ["--keys", "{truncated}", "--queries", "{queries}"], "labels", "keys"),
    ("labels-keys-missing", LABELS + ["--keys", "{missing}", "--queries", "{queries}"], "labels", "keys"),
    ("labels-keys-3d", LABELS + ["--keys", "{three_d}", "--queries", "{queries}"], "labels", "keys"),
    ("labels-keys-empty", LABELS + ["--keys", "{empty}", "--queries", "{queries}"], "labels", "keys"),
    ("labels-queries-nan", LABELS + ["--keys", "{keys}", "--queries", "{nan}"], "labels", "queries"),
    ("labels-queries-inf", LABELS + ["--keys", "{keys}", "--queries", "{inf}"], "labels", "queries"),
    ("labels-queries-wrong-d", LABELS + ["--keys", "{keys}", "--queries", "{wrong_d}"], "labels", "queries"),
    ("labels-queries-1d", LABELS + ["--keys", "{keys}", "--queries", "{one_d}"], "labels", "queries"),
    ("labels-device-gpu", LABELS + ["--keys", "{keys}", "--queries", "{queries}", "--device", "gpu"], "labels", "device"),
    ("labels-device-cuda7", LABELS + ["--keys", "{keys}", "--queries", "{queries}", "--device", "cuda:7"], "labels", "device"),
    ("labels-topk-500", LABELS + ["--keys", "{keys}", "--queries", "{queries}", "--topk", "500"], "labels", "topk"),
    ("labels-topk-0", LABELS + ["--keys", "{keys}", "--queries", "{queries}", "--topk", "0"], "labels", "topk"),
    ("labels-threads-0", LABELS + ["--keys", "{keys}", "--queries", "{queries}", "--threads", "0"], "labels", "threads"),
    ("labels-partitions-short", LABELS + ["--keys", "{keys}", "--queries", "{queries}", "--partitions", "{short_partitions}"], "labels", "partitions"),
    ("labels-partitions-missing", LABELS + ["--keys", "{keys}", "--queries", "{queries}", "--partitions", "{missing}"], "labels", "partitions"),
    ("labels-scores-overflow", LABELS + ["--keys", "{huge_keys}", "--queries", "{huge_queries}"], "labels", "queries, keys"),
    ("labels-out-is-file", ["labels", "--quiet", "--keys", "{keys}", "--queries", "{queries}", "--out", "{a_file}"], "labels", "out"),
    ("labels-out-other-job", ["labels", "--quiet", "--keys", "{other_keys}", "--queries", "{queries}", "--out", "{root}/labels_nopart"], "labels", "out"),
    ("labels-missing-flag", ["labels", "--keys", "{keys}"], "labels", "--queries"),
    # index build / info / export-faiss
    ("build-keys-empty", BUILD + ["--keys", "{empty}"], "index build", "keys"),
    ("build-keys-0byte", BUILD + ["--keys", "{zero}"], "index build", "keys"),
    ("build-keys-nan", BUILD + ["--keys", "{nan}"], "index build", "keys"),
    ("build-keys-1d", BUILD + ["--keys", "{one_d}"], "index build", "keys"),
    ("build-n-lists-0", ["index", "build", "--keys", "{keys}", "--n-lists", "0", "--out", "{tmp}/out"], "index build", "n-lists"),
    ("build-threshold-above-1", BUILD + ["--keys", "{keys}", "--pq-subspaces", "4", "--anisotropic-threshold", "1.5"],
     "index build", "anisotropic_threshold"),
    ("build-n-lists-too-many", ["index", "build", "--keys", "{keys}", "--n-lists", "999", "--out", "{tmp}/out"], "index build", "n-lists"),
    ("build-device-gpu", BUILD + ["--keys", "{keys}", "--device", "gpu"], "index build", "device"),
    ("build-partitions-missing", BUILD + ["--keys", "{keys}", "--partitions", "{missing}"], "index build", "partitions"),
    ("build-partitions-2d", BUILD + ["--keys", "{keys}", "--partitions", "{queries}"], "index build", "partitions"),
    ("build-out-existing", ["index", "build", "--keys", "{keys}", "--n-lists", "4", "--out", "{root}/index"], "index build", "--overwrite"),
    ("build-out-is-file", ["index", "build", "--keys", "{keys}", "--n-lists", "4", "--out", "{a_file}"], "index build", "out"),
    ("info-missing", ["index", "info", "{missing}"], "index info", "index"),
    ("export-out-existing", ["index", "export-faiss", "{root}/index", "--out", "{root}/existing.faiss"], "index export-faiss", "--overwrite"),
    ("export-index-unfinished", ["index", "export-faiss", "{root}/index_unfinished", "--out", "{tmp}/x.faiss"], "index export-faiss", "index"),
    # train
    ("train-labels-other-keys", TRAIN + ["--keys", "{other_keys}", "--queries", "{queries}", "--labels", "{root}/labels_nopart"], "train", "keys"),
    ("train-labels-other-queries", TRAIN + ["--keys", "{keys}", "--queries", "{other_queries}", "--labels", "{root}/labels_nopart"], "train", "queries"),
    ("train-labels-other-partitions", TRAIN + ["--keys", "{keys}", "--queries", "{queries}", "--labels", "{root}/labels", "--partitions", "{other_partitions}"], "train", "partitions"),
    ("train-labels-no-manifest", TRAIN + ["--keys", "{keys}", "--queries", "{queries}", "--labels", "{root}/not_labels"], "train", "labels"),
    ("train-partitions-unfinished-index", TRAIN + ["--keys", "{keys}", "--queries", "{queries}", "--partitions", "{root}/index_unfinished/partitions.npy"], "train", "partitions"),
    ("train-partitions-other-keys-index", TRAIN + ["--keys", "{other_keys}", "--queries", "{queries}", "--partitions", "{root}/index/partitions.npy"], "train", "keys"),
    ("train-partitions-missing", TRAIN + ["--keys", "{keys}", "--queries", "{queries}", "--partitions", "{missing}"], "train", "partitions"),
    ("train-device-gpu", ["train", "--model", "keynet", "--out", "{tmp}/out", "--device", "gpu", "--keys", "{keys}", "--queries", "{queries}"], "train", "device"),
    ("train-keys-0byte", TRAIN + ["--keys", "{zero}", "--queries", "{queries}"], "train", "keys"),
    ("train-queries-wrong-d", TRAIN + ["--keys", "{keys}", "--queries", "{wrong_d}"], "train", "queries"),
    ("train-out-existing-run", TRAIN[:4] + ["{root}/run"] + TRAIN[5:] + ["--keys", "{keys}", "--queries", "{queries}"], "train", "out: "),
    ("train-overwrite-and-resume", TRAIN + ["--keys", "{keys}", "--queries", "{queries}", "--overwrite", "--resume"], "train", "overwrite"),
    # eval
    # tune (every check runs before the output folder is touched)
    ("tune-queries-nan", TUNE + ["--keys", "{keys}", "--queries", "{nan}", "--target", "match@1=0.9"], "tune", "queries"),
    ("tune-keys-missing", TUNE + ["--keys", "{missing}", "--queries", "{queries}", "--target", "0.9"], "tune", "keys"),
    ("tune-target-out-of-range", TUNE + ["--keys", "{keys}", "--queries", "{queries}", "--target", "match@1=1.2"],
     "tune", "target"),
    ("tune-metric-unknown", TUNE + ["--keys", "{keys}", "--queries", "{queries}", "--target", "ndcg@10=0.9"],
     "tune", "metric"),
    ("eval-k-5000", EVAL + ["--queries", "{queries}", "--k", "5000"], "eval", "k: must be in [1, 128]"),
    ("eval-k-0", EVAL + ["--queries", "{queries}", "--k", "0"], "eval", "k:"),
    ("eval-nprobe-0", EVAL + ["--queries", "{queries}", "--nprobe", "0"], "eval", "nprobe"),
    ("eval-nprobe-99", EVAL + ["--queries", "{queries}", "--nprobe", "99"], "eval", "nprobe"),
    ("eval-device-gpu", EVAL + ["--queries", "{queries}", "--device", "gpu"], "eval", "device"),
    ("eval-queries-0byte", EVAL + ["--queries", "{zero}"], "eval", "queries"),
    ("eval-queries-wrong-d", EVAL + ["--queries", "{wrong_d}"], "eval", "queries"),
    ("eval-index-unfinished", ["eval", "--index", "{root}/index_unfinished", "--queries", "{queries}"], "eval", "index"),
    ("eval-json-existing", EVAL + ["--queries", "{queries}", "--json", "{root}/existing.json"], "eval", "--overwrite"),
    ("eval-router-unfinished", EVAL + ["--queries", "{queries}", "--router", "keynet:{root}/run_unfinished"], "eval", "--allow-unfinished"),
    ("eval-router-other-keys", EVAL + ["--queries", "{queries}", "--router", "keynet:{root}/run_other_keys"], "eval", "router"),
    ("eval-router-single-head-as-multi", EVAL + ["--queries", "{queries}", "--router", "router:{root}/run"], "eval", "router"),
    # mol (recommender)
    ("mol-train-ratings-missing", ["mol", "train", "--ratings", "{missing}", "--out", "{tmp}/out"], "mol", "ratings"),
    ("mol-train-ratings-no-column", ["mol", "train", "--ratings", "{ratings_nocol}", "--out", "{tmp}/out"], "mol", "ratings"),
    ("mol-train-ratings-non-numeric", ["mol", "train", "--ratings", "{ratings_nonnum}", "--out", "{tmp}/out"], "mol", "ratings"),
    ("mol-train-device-gpu", ["mol", "train", "--ratings", "{ratings_nocol}", "--out", "{tmp}/out", "--device", "gpu"], "mol", "device"),
    ("mol-eval-model-missing", ["mol", "eval", "--model", "{tmp}/none", "--ratings", "{ratings_nocol}"], "mol", "model"),
    # verify (the attack table in test_attacks.py tampers with every kind of artifact)
    ("verify-missing", ["verify", "{missing}"], "verify", "path"),
    ("verify-not-an-artifact", ["verify", "{tmp}"], "verify", "not an amips artifact"),
    ("verify-index-unfinished", ["verify", "{root}/index_unfinished"], "verify", "index"),
    ("verify-run-unfinished", ["verify", "{root}/run_unfinished"], "verify", "unfinished"),
    # demo (argument checks before any work)
    ("demo-nprobe-0", ["demo", "--quick", "--nprobe", "0", "--out", "{tmp}/demo"], "demo", "nprobe: 0 out of range, must be >= 1"),
    ("demo-train-minutes-0", ["demo", "--quick", "--train-minutes", "0", "--out", "{tmp}/demo"], "demo", "train-minutes"),
]


def _fill(argv, ws, tmp):
    values = {k: str(v) for k, v in ws.items()}
    return [a.format(tmp=tmp, **values) for a in argv]


@pytest.mark.parametrize("argv,cmd,name", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(ws, tmp_path, capsys, argv, cmd, name):
    if "cuda" in " ".join(argv) and torch.cuda.is_available() and "cuda:7" not in " ".join(argv):
        pytest.skip("CUDA present")
    rc = main(_fill(argv, ws, tmp_path))
    _one_line_error(capsys, rc, cmd, name)
    # nothing complete-looking left behind
    out = tmp_path / "out"
    for marker in ("labels.json", "index.json", "state.json", "model.safetensors"):
        assert not (out / marker).exists(), f"{marker} left in {out}"
    assert not (tmp_path / "x.faiss").exists()


def test_artifacts_left_untouched_by_refusals(ws):
    root = ws["root"]
    assert (root / "existing.faiss").read_bytes() == b"old"
    assert (root / "existing.json").read_text() == "{}"
    assert json.loads((root / "labels_nopart" / "labels.json").read_text())["complete"] is True


def test_every_flag_has_help_and_every_subcommand_is_covered():
    from amips.cli import build_parser

    parser = build_parser()
    seen = set()

    def walk(p, prefix):
        for action in p._actions:
            if action.choices and isinstance(action.choices, dict):  # subparsers
                for name, sub in action.choices.items():
                    walk(sub, prefix + [name])
            elif action.option_strings and action.dest not in ("help", "version"):
                assert action.help, f"amips {' '.join(prefix)} {action.option_strings[0]} has no help"
        seen.add(" ".join(prefix))

    walk(parser, [])
    covered = {c[2] for c in CLI_CASES} | {" ".join(c[1][:2]) for c in CLI_CASES if c[1][0] == "mol"}
    for cmd in seen - {""}:
        if cmd in ("index", "mol"):
            continue  # a group: its actions are covered
        assert cmd in covered, f"no bad-input case for `amips {cmd}`"


# --------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------
def _api_cases(ws):
    keys = np.load(ws["keys"])
    queries = np.load(ws["queries"])
    root = ws["root"]
    index = amips.IVFIndex.load(root / "index")
    huge = amips.IVFIndex.build(keys * 1e20, 2)
    nan_q = queries.copy()
    nan_q[0, 0] = np.nan
    return [
        ("exact_top1-nan", lambda: amips.exact_top1(nan_q, keys), "queries"),
        ("exact_top1-inf-keys", lambda: amips.exact_top1(queries, np.where(keys > 2, np.inf, keys)), "keys"),
        ("exact_top1-wrong-d", lambda: amips.exact_top1(queries[:, :5], keys), "dimension"),
        ("exact_top1-1d", lambda: amips.exact_top1(queries[0], keys), "queries"),
        ("exact_top1-3d-keys", lambda: amips.exact_top1(queries, keys.reshape(N_KEYS, 2, 4)), "keys"),
        ("exact_top1-empty-keys", lambda: amips.exact_top1(queries, keys[:0]), "keys"),
        ("exact_top1-bool", lambda: amips.exact_top1(queries > 0, keys), "queries"),
        ("exact_top1-device", lambda: amips.exact_top1(queries, keys, device="gpu"), "device"),
        ("exact_top1-overflow", lambda: amips.exact_top1(queries * 1e20, keys * 1e20), "queries, keys"),
        ("exact_topk-k-200", lambda: amips.exact_topk(queries, keys, k=200), "k"),
        ("exact_topk-k-0", lambda: amips.exact_topk(queries, keys, k=0), "k"),
        ("partition_top1-short", lambda: amips.partition_top1(queries, keys, np.zeros(5, np.int64)), "partition_ids"),
        ("partition_top1-float-ids", lambda: amips.partition_top1(queries, keys, np.zeros(N_KEYS)), "partition_ids"),
        ("load_array-0byte", lambda: amips.load_array(ws["zero"], name="keys"), "keys"),
        ("load_array-truncated", lambda: amips.load_array(ws["truncated"], name="keys"), "keys"),
        ("load_array-missing", lambda: amips.load_array(ws["missing"], name="keys"), "keys"),
        ("load_model-unfinished", lambda: amips.load_model(root / "run_unfinished"), "rundir"),
        ("load_model-missing", lambda: amips.load_model(root / "nothing"), "rundir"),
        ("load_model-device", lambda: amips.load_model(root / "run", device="gpu"), "device"),
        ("IVFIndex.build-n_lists-0", lambda: amips.IVFIndex.build(keys, 0), "n_lists"),
        ("IVFIndex.build-empty", lambda: amips.IVFIndex.build(keys[:0], 2), "keys"),
        ("IVFIndex.build-device", lambda: amips.IVFIndex.build(keys, 2, device="gpu"), "device"),
        ("IVFIndex.build-nan", lambda: amips.IVFIndex.build(nan_q, 2), "keys"),
        ("IVFIndex.load-missing", lambda: amips.IVFIndex.load(root / "nothing"), "index"),
        ("IVFIndex.load-unfinished", lambda: amips.IVFIndex.load(root / "index_unfinished"), "index"),
        ("IVFIndex.load-device", lambda: amips.IVFIndex.load(root / "index", device="cuda:7"), "device"),
        ("search-k-0", lambda: index.search(queries, k=0), "k"),
        ("search-nprobe-0", lambda: index.search(queries, 5, 0), "nprobe"),
        ("search-nprobe-big", lambda: index.search(queries, 5, N_LISTS + 1), "nprobe"),
        ("search-wrong-d", lambda: index.search(queries[:, :5], 5, 2), "queries"),
        ("search-scores-overflow", lambda: huge.search(queries * 1e20, 5, 2), "queries: scores overflow"),
        ("search-router-unfinished", lambda: index.search(queries, 5, 2, router=f"keynet:{root}/run_unfinished"), "rundir"),
        ("search-router-other-keys", lambda: index.search(queries, 5, 2, router=f"keynet:{root}/run_other_keys"), "router"),
        ("train-labels-other-keys", lambda: _train(ws, keys_name="other_keys", labels_dir=root / "labels_nopart"), "keys"),
        ("run_label_job-out-file", lambda: amips.labels.run_label_job(ws["keys"], ws["queries"], ws["a_file"], progress=False), "out"),
    ]


def _train(ws, *, keys_name="keys", **kw):
    from amips.train import TrainConfig, train

    out = Path(ws["root"]) / f"api_run_{np.random.default_rng().integers(1 << 30)}"
    cfg = TrainConfig(model="keynet", steps=2, batch_size=8, noise=0.0, width=8, depth=1)
    return train(ws[keys_name], ws["queries"], out, cfg, device="cpu", progress=False, **kw)




@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow case, inside the interpreter
def test_api_bad_inputs(ws):
    failures = []
    for case_id, call, name in _api_cases(ws):
        try:
            call()
        except InputError as exc:
            if name not in str(exc):
                failures.append(f"{case_id}: {name!r} not in {exc}")
        except Exception as exc:  # noqa: BLE001 - the test reports what leaked
            failures.append(f"{case_id}: raised {type(exc).__name__}: {exc}")
        else:
            failures.append(f"{case_id}: no error")
    assert not failures, "\n".join(failures)


def test_corrupt_run_files_are_input_errors(ws, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ws["root"] / "run", run)
    weights = run / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="rundir"):
        amips.load_model(run)
    weights.write_bytes(data)
    (run / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="rundir"):
        amips.load_model(run)


def test_unfinished_run_loads_only_when_asked(ws):
    with pytest.warns(UserWarning, match="step 3 of 3"):
        model = amips.load_model(ws["root"] / "run_unfinished", allow_unfinished=True)
    assert model.kind == "keynet"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        amips.load_model(ws["root"] / "run")  # finished: no warning


def test_eval_allow_unfinished_and_json_into_new_folder(ws, tmp_path, capsys):
    js = tmp_path / "new" / "deeper" / "r.json"
    # a --json into a folder that does not exist is refused before any work ...
    assert main(["eval", "--index", str(ws["root"] / "index"), "--queries", ws["queries"],
                 "--nprobe", "1", "--json", str(js)]) == 2
    assert "does not exist" in capsys.readouterr().err and not js.parent.exists()
    js.parent.mkdir(parents=True)  # ... and written once the folder is there
    with pytest.warns(UserWarning, match="unfinished"):
        rc = main(["eval", "--index", str(ws["root"] / "index"), "--queries", ws["queries"],
                   "--router", f"keynet:{ws['root']}/run_unfinished", "--allow-unfinished",
                   "--nprobe", "1", "--repeats", "0", "--single", "0", "--max-queries", "2",
                   "--json", str(js)])
    assert rc == 0 and json.loads(js.read_text())["results"]
    out = tmp_path / "sub" / "ix.faiss"
    out.parent.mkdir()
    assert main(["index", "export-faiss", str(ws["root"] / "index"), "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert main(["index", "export-faiss", str(ws["root"] / "index"), "--out", str(out), "--overwrite"]) == 0


# --------------------------------------------------------------------------------------
# policies that are answers, not errors
# --------------------------------------------------------------------------------------
def test_integer_inputs_are_upcast_everywhere(tmp_path):
    rng = np.random.default_rng(3)
    keys = rng.integers(-50, 50, (300, 6)).astype(np.int32)
    queries = rng.integers(-50, 50, (25, 6)).astype(np.int16)
    exact = queries.astype(np.float64) @ keys.astype(np.float64).T
    s, i = amips.exact_top1(queries, keys)
    assert np.array_equal(s.numpy().astype(np.float64), exact.max(1))
    # tie-aware: the returned index attains the max, lowest index among ties
    assert np.array_equal(i.numpy(), exact.argmax(1))
    s2, i2 = amips.exact_top1(torch.from_numpy(queries), torch.from_numpy(keys))
    assert torch.equal(i2, i)
    np.save(tmp_path / "k.npy", keys)
    np.save(tmp_path / "q.npy", queries)
    assert main(["labels", "--keys", str(tmp_path / "k.npy"), "--queries", str(tmp_path / "q.npy"),
                 "--out", str(tmp_path / "lab"), "--quiet"]) == 0
    assert np.array_equal(np.load(tmp_path / "lab" / "top1_index.npy"), i.numpy())


@pytest.mark.parametrize("k_scale,q_scale", [(1e20, 1.0), (1.0, 1e-30), (1e-25, 1e-25), (1e18, 1e18)])
def test_out_of_fp32_range_inputs_get_the_exact_answer(k_scale, q_scale):
    rng = np.random.default_rng(4)
    keys = rng.standard_normal((300, 12))
    queries = rng.standard_normal((30, 12))
    keys[7] = keys[3]  # an exact tie: the lower index wins
    kk, qq = keys * k_scale, queries * q_scale
    exact = qq @ kk.T
    for dtype in (np.float32, np.float64):
        # float64 scores: exact even where float32 cannot hold them (1e-25 x 1e-25)
        s, i = amips.exact_top1(qq.astype(dtype), kk.astype(dtype), score_dtype="float64")
        e = qq.astype(dtype).astype(np.float64) @ kk.astype(dtype).astype(np.float64).T
        assert np.array_equal(i.numpy(), e.argmax(1)), dtype
        np.testing.assert_allclose(s.numpy(), e.max(1), rtol=1e-12)
    ts, ti = amips.exact_topk(qq, kk, k=3, score_dtype="float64")
    assert np.array_equal(ti[:, 0].numpy(), exact.argmax(1))
    ps, pi = amips.partition_top1(qq, kk, np.arange(300) % 5, score_dtype="float64")
    for p in range(5):
        members = np.flatnonzero(np.arange(300) % 5 == p)
        assert np.array_equal(pi[:, p].numpy(), members[exact[:, members].argmax(1)])


def test_labels_cli_on_huge_finite_fp64_inputs(tmp_path, capsys):
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((200, 8)) * 1e200
    queries = rng.standard_normal((20, 8)) * 1e-200
    np.save(tmp_path / "k.npy", keys)
    np.save(tmp_path / "q.npy", queries)
    assert main(["labels", "--keys", str(tmp_path / "k.npy"), "--queries", str(tmp_path / "q.npy"),
                 "--out", str(tmp_path / "lab"), "--quiet"]) == 0
    exact = queries @ keys.T
    assert np.array_equal(np.load(tmp_path / "lab" / "top1_index.npy"), exact.argmax(1))


# --------------------------------------------------------------------------------------
# subprocesses: no traceback reaches a user; kills while writing the final outputs
# --------------------------------------------------------------------------------------
def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _amips(args, **env):
    return subprocess.run([sys.executable, "-m", "amips", *map(str, args)], env=_env(**env),
                          capture_output=True, text=True, timeout=120)


def test_subprocess_errors_have_no_traceback(ws, tmp_path):
    r = _amips(["labels", "--keys", ws["zero"], "--queries", ws["queries"], "--out", tmp_path / "o",
                "--device", "gpu"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("amips labels: error: device")


def test_labels_killed_while_writing_final_outputs(ws, tmp_path):
    root = ws["root"]
    job = ["labels", "--keys", ws["keys"], "--queries", ws["queries"], "--topk", "3", "--quiet"]
    clean = tmp_path / "clean"
    assert main([*map(str, job), "--out", str(clean)]) == 0

    def same_as_clean(folder):
        for name in ("top1_index", "top1_score", "topk_index", "topk_score"):
            assert np.array_equal(np.load(folder / f"{name}.npy"), np.load(clean / f"{name}.npy"))
        assert json.loads((folder / "labels.json").read_text())["complete"] is True

    # a job killed between two of its final files leaves nothing complete-looking ...
    out = tmp_path / "lab"
    r = _amips([*job, "--out", out], AMIPS_FAULT_POINT="labels-outputs:2")
    assert r.returncode == -9, r.stderr
    assert (out / "top1_index.npy").exists() and not (out / "labels.json").exists()
    with pytest.raises(InputError, match="labels.json"):  # nothing complete-looking for consumers
        _train(ws, labels_dir=out)
    assert main([*map(str, job), "--out", str(out)]) == 0  # ... and the same command finishes it
    same_as_clean(out)
    # with --overwrite the new labels are built beside the old ones: killed the same way, the
    # old folder (a complete job of other options) is left whole, and a rerun replaces it
    old = tmp_path / "old"
    shutil.copytree(root / "labels_nopart", old)
    before = {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()}
    r = _amips([*job, "--out", old, "--overwrite"], AMIPS_FAULT_POINT="labels-outputs:2")
    assert r.returncode == -9, r.stderr
    assert {p.name: p.read_bytes() for p in old.iterdir() if p.is_file()} == before
    assert main([*map(str, job), "--out", str(old), "--overwrite"]) == 0
    same_as_clean(old)
    assert not [p for p in tmp_path.iterdir() if ".amips-new-" in p.name or ".amips-old-" in p.name]


def test_index_build_killed_while_writing_final_outputs(ws, tmp_path):
    out = tmp_path / "ix"
    args = ["index", "build", "--keys", ws["keys"], "--n-lists", str(N_LISTS), "--out", out, "--quiet"]
    r = _amips(args, AMIPS_FAULT_POINT="index-files")
    assert r.returncode == -9, r.stderr
    assert (out / "lists.safetensors").exists() and not (out / "index.json").exists()
    with pytest.raises(InputError, match="index"):
        amips.IVFIndex.load(out)
    with pytest.raises(InputError, match="did not finish"):
        _train(ws, partitions=out / "partitions.npy")
    assert main([str(a) for a in args]) == 0  # the same command resumes from its k-means
    for name in ("partitions.npy", "centroids.npy"):
        assert (out / name).read_bytes() == (ws["root"] / "index" / name).read_bytes()
    a = json.loads((out / "index.json").read_text())
    b = json.loads((ws["root"] / "index" / "index.json").read_text())
    assert a["partitions_sha256"] == b["partitions_sha256"] and a["inputs"] == b["inputs"]


def test_training_killed_while_writing_final_outputs(ws, tmp_path):
    out = tmp_path / "run"
    common = ["--steps", "3", "--batch-size", "16", "--noise", "0", "--eval-every", "3",
              "--val-fraction", "0.25", "--device", "cpu", "--quiet", "--width", "8", "--depth", "1"]
    args = ["train", "--keys", ws["keys"], "--queries", ws["queries"], "--model", "keynet", "--out", out, *common]
    r = _amips(args, AMIPS_FAULT_POINT="train-final")
    assert r.returncode == -9, r.stderr
    assert (out / "model.safetensors").exists() and not (out / "state.json").exists()
    with pytest.raises(InputError, match="unfinished"):
        amips.load_model(out)
    assert main([str(a) for a in args] + ["--resume"]) == 0
    from safetensors.torch import load_file

    mine = load_file(str(out / "model.safetensors"))
    clean = load_file(str(ws["root"] / "run" / "model.safetensors"))
    assert mine.keys() == clean.keys()
    for name in mine:
        assert torch.equal(mine[name], clean[name]), name
    amips.load_model(out)


def test_provenance_accepts_the_same_data_in_another_dtype(tmp_path):
    """No false refusal: an fp64 keys file, an index built from it (stored as fp32) and a
    router trained on the same file agree; so do fp16 and fp32 copies of the same values."""
    rng = np.random.default_rng(6)
    np.save(tmp_path / "k.npy", rng.standard_normal((120, 8)))
    np.save(tmp_path / "q.npy", rng.standard_normal((24, 8)).astype(np.float32))
    build_index_and_router(tmp_path, 3, steps=2, batch_size=8, width=8)
    index = amips.IVFIndex.load(tmp_path / "ix")
    index.search(np.load(tmp_path / "q.npy")[:2], 3, 1, router=f"router:{tmp_path / 'run'}")
    from amips.provenance import fingerprint

    half = rng.standard_normal((10, 4)).astype(np.float16)
    assert fingerprint(half)["sha256"] == fingerprint(half.astype(np.float32))["sha256"]
    assert fingerprint(half)["sha256"] != fingerprint(half[::-1].copy())["sha256"]


def test_resume_on_other_queries_is_refused(ws, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(ws["root"] / "run", run)
    rc = main(["train", "--keys", ws["keys"], "--queries", ws["other_queries"], "--model", "keynet",
               "--out", str(run), "--resume", "--steps", "3", "--batch-size", "16", "--noise", "0",
               "--eval-every", "3", "--val-fraction", "0.25", "--device", "cpu", "--quiet",
               "--width", "8", "--depth", "1"])
    _one_line_error(capsys, rc, "train", "queries: the run in")


def test_index_build_refuses_a_bad_threshold_before_its_kmeans(ws, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["index", "build", "--keys", str(ws["keys"]), "--n-lists", "4", "--out", str(out),
               "--pq-subspaces", "4", "--anisotropic-threshold", "1.0"])
    _one_line_error(capsys, rc, "index build", "anisotropic_threshold")
    assert not (out / "partitions.npy").exists()  # refused up front, no k-means ran
