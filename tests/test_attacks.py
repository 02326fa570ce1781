"""The attack table: every command x every class of attack on the disk.

Classes: a bad path or a typo next to ``--overwrite``, an error found only once the work
started (``--overwrite`` must still keep the old artifact), a special file as the output (a
FIFO, a symlink to ``/dev/null``), an output inside or over another kind of artifact, a
concurrent writer, a tampered file, an unfinished input, a corrupt or hand-edited file.
Every row must exit 2 with ONE line on stderr and no traceback, and leave every protected
path (the old artifact, the special file, the inputs) byte for byte as it was. A few tests
use real processes where process-level behaviour matters (locks held by a live or dead pid,
two takers of a stale lock).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from amips.cli import main as _main
from amips.mol.data import generate_ratings

REPO = Path(__file__).resolve().parents[1]
N_KEYS, N_Q, D, N_LISTS = 300, 60, 8, 4
MOL_TINY = ["--d", "8", "--layers", "1", "--heads", "1", "--max-len", "8", "--p-q", "2", "--p-x", "2",
            "--d-p", "4", "--gate-hidden", "8", "--negatives", "8", "--inbatch-negatives", "4",
            "--batch-size", "16", "--max-positions", "32"]


# --------------------------------------------------------------------------------------
# the world: inputs and one finished (and one unfinished) artifact of every kind
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks")
    rng = np.random.default_rng(0)
    np.save(root / "keys.npy", rng.standard_normal((N_KEYS, D)).astype(np.float32))
    np.save(root / "queries.npy", rng.standard_normal((N_Q, D)).astype(np.float32))
    np.save(root / "other_queries.npy", rng.standard_normal((N_Q, D)).astype(np.float32))
    np.save(root / "partitions.npy", (np.arange(N_KEYS) % N_LISTS).astype(np.int64))
    huge = (np.arange(N_KEYS) % N_LISTS).astype(np.int64)
    huge[7] = 10**12  # would size an 8 TB score table if trusted
    np.save(root / "huge_partitions.npy", huge)
    (root / "text_partitions.npy").write_text("0 1 2 3\n" * 10)
    np.zeros((N_KEYS, 5), np.float32).tofile(root / "fvecs_partitions.fvecs")
    nan_q = np.load(root / "queries.npy")
    nan_q[-1, 0] = np.nan  # found only while the batches are labelled
    np.save(root / "late_nan_queries.npy", nan_q)
    generate_ratings(root / "ratings.csv", n_users=40, n_items=30, min_len=6, max_len=12, seed=1)
    generate_ratings(root / "other_ratings.csv", n_users=40, n_items=30, min_len=6, max_len=12, seed=2)
    (root / "bad_ratings.csv").write_text("user,item\n1,2\n")
    k, q = str(root / "keys.npy"), str(root / "queries.npy")
    assert main(["labels", "--keys", k, "--queries", q, "--out", str(root / "lab"), "--quiet"]) == 0
    assert main(["index", "build", "--keys", k, "--n-lists", str(N_LISTS), "--out", str(root / "ix"),
                 "--quiet"]) == 0
    train = ["train", "--keys", k, "--queries", q, "--model", "keynet", "--device", "cpu", "--quiet",
             "--noise", "0", "--batch-size", "32", "--width", "16", "--depth", "1"]
    assert main([*train, "--out", str(root / "run"), "--steps", "4"]) == 0
    # stopped by --max-minutes after its first step: a run that must never load as finished
    assert main([*train, "--out", str(root / "run_stopped"), "--steps", "500", "--max-minutes", "1e-9"]) == 0
    mol = ["mol", "train", "--ratings", str(root / "ratings.csv"), "--quiet", *MOL_TINY]
    assert main([*mol, "--out", str(root / "mol"), "--epochs", "1"]) == 0
    assert main([*mol, "--out", str(root / "mol_stopped"), "--epochs", "3", "--max-minutes", "1e-9"]) == 0
    # an earlier demo run (its manifest and folders; the demo itself is not rerun here)
    (root / "demo" / "runs").mkdir(parents=True)
    (root / "demo" / "index").mkdir()
    (root / "demo" / "results.json").write_text('{"rows": []}\n')
    (root / "demo" / "notes.txt").write_text("the user's own file\n")
    return root


@pytest.fixture
def w(world, tmp_path):
    """A private copy of the world, so a row may damage it freely."""
    dst = tmp_path / "w"
    shutil.copytree(world, dst, symlinks=True)
    return dst


def main(argv) -> int:
    return _main([str(a) for a in argv])


def snapshot(path: Path):
    """Everything a path is: file bytes, folder trees, FIFO / symlink / device identity."""
    if os.path.islink(path):
        return ("symlink", os.readlink(path))
    if not path.exists():
        return None
    mode = os.stat(path).st_mode
    if stat.S_ISFIFO(mode):
        return ("fifo",)
    if stat.S_ISCHR(mode):
        return ("chardev", os.stat(path).st_rdev)
    if path.is_dir():
        return {str(p.relative_to(path)): snapshot(p) for p in sorted(path.rglob("*"))}
    return hashlib.sha256(path.read_bytes()).hexdigest()


def attack(capsys, argv, protect, *, expect=None):
    """Run a command that must be refused: exit 2, one line, no traceback, protected paths intact."""
    protect = [Path(p) for p in protect]
    before = {p: snapshot(p) for p in protect}
    devnull = snapshot(Path("/dev/null"))
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("amips ") and ": error: " in lines[0], err
    if expect is not None:
        assert expect in lines[0], lines[0]
    for p in protect:
        assert snapshot(p) == before[p], f"{p} changed"
    assert snapshot(Path("/dev/null")) == devnull
    for p in protect:  # no replacement left half-built beside a protected artifact
        leftovers = [q.name for q in p.parent.glob(f".{p.name}.amips-*") if not q.name.endswith("-lock")]
        assert not leftovers, leftovers
    return lines[0]


# --------------------------------------------------------------------------------------
# the writers, each with its artifact in the world and a typo to make
# --------------------------------------------------------------------------------------
def _labels(w, out, **kw):
    return ["labels", "--keys", kw.get("keys", w / "keys.npy"), "--queries", kw.get("queries", w / "queries.npy"),
            "--out", out, "--quiet", *kw.get("extra", [])]


def _train(w, out, **kw):
    return ["train", "--keys", kw.get("keys", w / "keys.npy"), "--queries", kw.get("queries", w / "queries.npy"),
            "--model", "keynet", "--out", out, "--steps", kw.get("steps", "3"), "--device", "cpu", "--quiet", "--noise", "0",
            "--batch-size", "32", "--width", "16", "--depth", "1", *kw.get("extra", [])]


def _index(w, out, **kw):
    return ["index", "build", "--keys", kw.get("keys", w / "keys.npy"), "--n-lists", str(N_LISTS), "--out", out,
            "--quiet", *kw.get("extra", [])]


def _mol(w, out, **kw):
    return ["mol", "train", "--ratings", kw.get("ratings", w / "ratings.csv"), "--out", out, "--epochs", "1",
            "--quiet", *MOL_TINY, *kw.get("extra", [])]


def _demo(w, out, **kw):
    return ["demo", "--quick", "--no-plot", "--out", out, *kw.get("extra", [])]


WRITERS = {
    # name: (argv builder, the artifact it writes in the world, a typo in another argument)
    "labels": (_labels, "lab", {"queries": "missing.npy"}),
    "train": (_train, "run", {"queries": "missing.npy"}),
    "index build": (_index, "ix", {"extra": ["--pq-subspaces", "4", "--anisotropic-threshold", "2"]}),
    "mol train": (_mol, "mol", {"ratings": "missing.csv"}),
    "demo": (_demo, "demo", {"extra": ["--data", "missing-folder"]}),
}
# errors found only after the work began (in the replacement being built)
LATE = {
    "labels": lambda w: {"queries": w / "late_nan_queries.npy"},
    "train": lambda w: {"extra": ["--labels", str(w / "lab")], "queries": w / "other_queries.npy"},
    "mol train": lambda w: {"ratings": w / "bad_ratings.csv"},
}


@pytest.mark.parametrize("cmd", list(WRITERS))
def test_overwrite_with_a_typo_keeps_the_old_artifact(cmd, w, capsys):
    build, artifact, typo = WRITERS[cmd]
    attack(capsys, [*build(w, w / artifact, **typo), "--overwrite"], [w / artifact, w / "keys.npy"])


@pytest.mark.parametrize("cmd", list(LATE))
def test_overwrite_failing_mid_work_keeps_the_old_artifact(cmd, w, capsys):
    build, artifact, _ = WRITERS[cmd]
    attack(capsys, [*build(w, w / artifact, **LATE[cmd](w)), "--overwrite"], [w / artifact])


def _special_output(w: Path, special: str) -> Path:
    """An output path that is a FIFO, a regular file or a symlink to /dev/null."""
    out = w / "special"
    if special == "fifo":
        os.mkfifo(out)
    elif special == "file":
        out.write_text("not a folder\n")
    else:
        out.symlink_to("/dev/null")
    return out


@pytest.mark.parametrize("cmd", list(WRITERS))
@pytest.mark.parametrize("special", ["fifo", "symlink-to-dev-null", "file"])
def test_special_file_as_output_folder_is_never_replaced(cmd, special, w, capsys):
    build, _, _ = WRITERS[cmd]
    out = _special_output(w, special)
    for overwrite in ([], ["--overwrite"]):
        attack(capsys, [*build(w, out), *overwrite], [out])


# commands that write one file (--json, --out FILE)
FILE_WRITERS = {
    "eval --json": lambda w, f: ["eval", "--index", w / "ix", "--queries", w / "queries.npy", "--nprobe", "1",
                                 "--repeats", "0", "--single", "0", "--json", f],
    "eval --plot": lambda w, f: ["eval", "--index", w / "ix", "--queries", w / "queries.npy", "--nprobe", "1",
                                 "--repeats", "0", "--single", "0", "--plot", f],
    "mol eval --json": lambda w, f: ["mol", "eval", "--model", w / "mol", "--ratings", w / "ratings.csv",
                                     "--methods", "none", "--repeats", "1", "--json", f],
    "index export-faiss": lambda w, f: ["index", "export-faiss", w / "ix", "--out", f],
}


@pytest.mark.parametrize("cmd", list(FILE_WRITERS))
@pytest.mark.parametrize("case", ["fifo", "symlink-to-dev-null", "exists", "missing-folder", "folder"])
def test_file_outputs_are_checked_before_the_work(cmd, case, w, capsys):
    f = w / "result.out"
    if case == "fifo":
        os.mkfifo(f)
    elif case == "symlink-to-dev-null":
        f.symlink_to("/dev/null")
    elif case == "exists":
        f.write_text("earlier results\n")
    elif case == "missing-folder":
        f = w / "no" / "such" / "r.json"
    else:
        f.mkdir()
    attack(capsys, FILE_WRITERS[cmd](w, f), [f, w / "ix", w / "mol"])
    if case == "missing-folder":
        assert not (w / "no").exists()


@pytest.mark.parametrize("cmd", [c for c in WRITERS if c != "demo"])
def test_output_inside_or_over_another_kind_of_artifact(cmd, w, capsys):
    build, artifact, _ = WRITERS[cmd]
    other = "run" if artifact == "ix" else "ix"
    attack(capsys, build(w, w / other / "sub"), [w / other], expect="inside")
    attack(capsys, [*build(w, w / other), "--overwrite"], [w / other], expect="holds an amips")


def test_demo_over_another_kind_of_artifact(w, capsys):
    attack(capsys, ["demo", "--quick", "--out", w / "ix", "--overwrite"], [w / "ix"], expect="holds an amips index")


def test_overwrite_refuses_a_folder_of_foreign_files(w, capsys):
    (w / "mine").mkdir()
    (w / "mine" / "thesis.tex").write_text("years of work\n")
    attack(capsys, [*_index(w, w / "mine"), "--overwrite"], [w / "mine"], expect="not an amips index")


# `amips tune` resumes in place, so it is not in WRITERS (whose --overwrite swaps a
# replacement in); its output is checked and locked the same way, and --overwrite restarts
# a tune only after every input has been checked
def _tune(w, out, **kw):
    return ["tune", "--keys", kw.get("keys", w / "keys.npy"), "--queries", kw.get("queries", w / "queries.npy"),
            "--target", "match@1=0.5", "--budget", "0.05", "--no-progress", "--out", out, *kw.get("extra", [])]


def _fake_tune(folder: Path) -> Path:
    (folder / "state").mkdir(parents=True)
    (folder / "state" / "fingerprint.json").write_text('{"version": 1}\n')
    (folder / "report.json").write_text('{"reached": true}\n')
    return folder


@pytest.mark.parametrize("special", ["fifo", "symlink-to-dev-null", "file"])
def test_tune_never_replaces_a_special_output(special, w, capsys):
    out = _special_output(w, special)
    for overwrite in ([], ["--overwrite"]):
        attack(capsys, [*_tune(w, out), *overwrite], [out])


def test_tune_inside_or_over_another_kind_of_artifact_and_typos(w, capsys, live_pid):
    attack(capsys, _tune(w, w / "ix" / "sub"), [w / "ix"], expect="inside")
    attack(capsys, [*_tune(w, w / "ix"), "--overwrite"], [w / "ix"], expect="holds an amips index")
    old = _fake_tune(w / "old-tune")
    attack(capsys, [*_tune(w, old, queries=w / "missing.npy"), "--overwrite"], [old], expect="queries")
    _write_lock(old, live_pid)
    line = attack(capsys, [*_tune(w, old), "--overwrite"], [old], expect=f"pid {live_pid}")
    assert "amips test-holder" in line


# --------------------------------------------------------------------------------------
# concurrent writers: a lock held by a live process, taken over from a dead one
# --------------------------------------------------------------------------------------
def _lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.amips-lock"


def _write_lock(folder: Path, pid: int) -> None:
    import socket

    _lock_path(folder).write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                              "command": "amips test-holder", "started": "then"}))


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("cmd", list(WRITERS))
def test_concurrent_writer_is_refused_by_name(cmd, w, capsys, live_pid):
    build, artifact, _ = WRITERS[cmd]
    # replacing the artifact another process is writing, or writing a new folder it is creating
    for out, overwrite in ((w / artifact, ["--overwrite"]), (w / "fresh", [])):
        _write_lock(out, live_pid)
        line = attack(capsys, [*build(w, out), *overwrite], [out], expect=f"pid {live_pid}")
        assert "amips test-holder" in line
        assert _lock_path(out).exists()  # the holder's lock is left alone
    assert not (w / "fresh").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(w, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(w / "ix", dead.pid)
    assert main([*_index(w, w / "ix"), "--overwrite"]) == 0
    assert not _lock_path(w / "ix").exists()
    assert main(["verify", str(w / "ix")]) == 0


_RACER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from amips._outputs import ArtifactLock
    from amips._validate import InputError
    go = Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.005)
    try:
        lock = ArtifactLock(sys.argv[1], "racer").acquire()
    except InputError:
        print("lost"); sys.exit(0)
    print("won", flush=True)
    time.sleep(3)
    lock.release()
""")


def test_two_processes_cannot_both_take_a_stale_lock(tmp_path):
    folder = tmp_path / "art"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(folder, dead.pid)
    go = tmp_path / "go"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, str(folder), str(go)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    time.sleep(2.5)  # every racer imported amips and waits for the start
    go.touch()
    results = [r.communicate(timeout=60) for r in racers]
    outs = [out.strip() for out, _ in results]
    assert sorted(outs) == ["lost", "lost", "won"], results


def test_second_real_process_is_refused_while_the_first_writes(w):
    """Two real `amips` processes on one --out: the second exits 2 naming the first."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from amips._outputs import ArtifactLock; "
         "l = ArtifactLock(sys.argv[1], 'amips index build (first)').acquire(); print('locked', flush=True); "
         "time.sleep(60)", str(w / "ix2")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run([sys.executable, "-m", "amips", *map(str, _index(w, w / "ix2"))],
                                capture_output=True, text=True, timeout=120,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert second.returncode == 2 and f"pid {holder.pid}" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr and not (w / "ix2").exists()
    finally:
        holder.kill()
        holder.wait()
    # the first writer died holding the lock: the next build takes it over and finishes
    assert main(_index(w, w / "ix2")) == 0
    assert main(["verify", str(w / "ix2")]) == 0


# --------------------------------------------------------------------------------------
# tampered, unfinished and corrupt inputs: refused by name, whoever reads them
# --------------------------------------------------------------------------------------
def _flip_byte(path: Path, at: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _eval(w, **kw):
    return ["eval", "--index", kw.get("index", w / "ix"), "--queries", w / "queries.npy", "--nprobe", "1",
            "--repeats", "0", "--single", "0", *kw.get("extra", [])]


def _mol_eval(w, model="mol", ratings="ratings.csv"):
    return ["mol", "eval", "--model", w / model, "--ratings", w / ratings, "--methods", "none", "--repeats", "1"]


def _train_with_labels(w):
    return _train(w, w / "new_run", extra=["--labels", str(w / "lab")])


def _tamper(w, rel):
    _flip_byte(w / rel)


READERS = [
    # (case, damage, argv, the name the error must carry)
    ("index lists.safetensors", lambda w: _tamper(w, "ix/lists.safetensors"), _eval, "lists.safetensors"),
    ("index centroids.npy", lambda w: _tamper(w, "ix/centroids.npy"), _eval, "centroids.npy"),
    ("index partitions.npy", lambda w: _tamper(w, "ix/partitions.npy"), _eval, "partitions.npy"),
    ("index truncated file", lambda w: (w / "ix/lists.safetensors").write_bytes(
        (w / "ix/lists.safetensors").read_bytes()[:100]), _eval, "lists.safetensors"),
    ("index.json truncated", lambda w: (w / "ix/index.json").write_text('{"format": "amips-ivf", "n'),
     _eval, "index.json"),
    ("index.json wrong type", lambda w: _edit_json(w / "ix/index.json", n_lists="four"), _eval, "n_lists"),
    ("index.json missing field", lambda w: _edit_json(w / "ix/index.json", d=None), _eval, "'d'"),
    ("index.json not an object", lambda w: (w / "ix/index.json").write_text("[1, 2]"), _eval, "index.json"),
    ("centroids.npy 1-D", lambda w: _replace_npy(w / "ix/centroids.npy", np.zeros(N_LISTS * D, np.float32)),
     _eval, "centroids.npy"),
    ("index unfinished", lambda w: (w / "ix/.incomplete").write_text("x"), _eval, "did not finish"),
    ("router model.safetensors", lambda w: _tamper(w, "run/model.safetensors"),
     lambda w: _eval(w, extra=["--router", f"keynet:{w / 'run'}"]), "model.safetensors"),
    ("router config.json corrupt", lambda w: (w / "run/config.json").write_text("{not json"),
     lambda w: _eval(w, extra=["--router", f"keynet:{w / 'run'}"]), "config.json"),
    ("router stopped by --max-minutes", lambda w: None,
     lambda w: _eval(w, extra=["--router", f"keynet:{w / 'run_stopped'}"]), "unfinished"),
    ("labels top1_index.npy", lambda w: _tamper(w, "lab/top1_index.npy"), _train_with_labels, "top1_index.npy"),
    ("labels output deleted", lambda w: (w / "lab/top1_score.npy").unlink(), _train_with_labels, "top1_score.npy"),
    ("labels.json truncated", lambda w: (w / "lab/labels.json").write_text('{"complete": tr'),
     _train_with_labels, "labels.json"),
    ("labels.json wrong type", lambda w: _edit_json(w / "lab/labels.json", inputs="keys.npy"),
     _train_with_labels, "inputs"),
    ("labels.json not an object", lambda w: (w / "lab/labels.json").write_text('"labels"'),
     _train_with_labels, "labels.json"),
    ("index.json meta wrong type", lambda w: _edit_json(w / "ix/index.json", meta=[1]), _eval, "meta"),
    ("state.json hand-edited", lambda w: (w / "run/state.json").write_text('{"step": "four"}'),
     lambda w: _eval(w, extra=["--router", f"keynet:{w / 'run'}"]), "unfinished"),
    ("train --partitions text file", lambda w: None,
     lambda w: _train(w, w / "new_run", extra=["--partitions", str(w / "text_partitions.npy")]),
     "text_partitions.npy"),
    ("train --partitions fvecs", lambda w: None,
     lambda w: _train(w, w / "new_run", extra=["--partitions", str(w / "fvecs_partitions.fvecs")]), "partitions"),
    ("train --partitions id 1e12", lambda w: None,
     lambda w: _train(w, w / "new_run", extra=["--partitions", str(w / "huge_partitions.npy")]), "1000000000000"),
    ("labels --partitions id 1e12", lambda w: None,
     lambda w: _labels(w, w / "new_lab", extra=["--partitions", str(w / "huge_partitions.npy")]), "1000000000000"),
    ("index build --partitions id 1e12", lambda w: None,
     lambda w: _index(w, w / "new_ix", extra=["--partitions", str(w / "huge_partitions.npy")]), "1000000000000"),
    ("index build --partitions text", lambda w: None,
     lambda w: _index(w, w / "new_ix", extra=["--partitions", str(w / "text_partitions.npy")]), "partitions"),
    ("train --resume truncated checkpoint", lambda w: (w / "run_stopped/checkpoint.safetensors").write_bytes(
        (w / "run_stopped/checkpoint.safetensors").read_bytes()[:200]),
     lambda w: _train(w, w / "run_stopped", steps="500", extra=["--resume"]), "checkpoint.safetensors"),
    ("mol weights", lambda w: _tamper(w, "mol/model.safetensors"), _mol_eval, "model.safetensors"),
    ("mol config.json corrupt", lambda w: (w / "mol/config.json").write_text("{"), _mol_eval, "config.json"),
    ("mol unfinished", lambda w: None, lambda w: _mol_eval(w, model="mol_stopped"), "unfinished"),
    ("mol other ratings", lambda w: None, lambda w: _mol_eval(w, ratings="other_ratings.csv"), "not the file"),
    ("mol train --resume truncated checkpoint",
     lambda w: (w / "mol_stopped/checkpoint.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
     lambda w: ["mol", "train", "--ratings", w / "ratings.csv", "--out", w / "mol_stopped", "--epochs", "3",
                "--quiet", *MOL_TINY, "--resume"], "checkpoint.safetensors"),
]


def _edit_json(path: Path, **changes) -> None:
    obj = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            obj.pop(k)
        else:
            obj[k] = v
    path.write_text(json.dumps(obj))


def _replace_npy(path: Path, arr: np.ndarray) -> None:
    np.save(path, arr)


@pytest.mark.parametrize("case,damage,argv,name", READERS, ids=[r[0] for r in READERS])
def test_tampered_unfinished_or_corrupt_input_is_refused_by_name(case, damage, argv, name, w, capsys):
    damage(w)
    protect = [w / d for d in ("ix", "lab", "run", "run_stopped", "mol", "mol_stopped")]
    attack(capsys, argv(w), protect, expect=name)


VERIFY = [
    ("ix", lambda w: _tamper(w, "ix/lists.safetensors"), "lists.safetensors"),
    ("lab", lambda w: _tamper(w, "lab/top1_score.npy"), "top1_score.npy"),
    ("run", lambda w: _tamper(w, "run/model.safetensors"), "model.safetensors"),
    ("run_stopped", lambda w: None, "unfinished"),
    ("mol", lambda w: _tamper(w, "mol/interactions.safetensors"), "interactions.safetensors"),
    ("mol_stopped", lambda w: None, "unfinished"),
]


@pytest.mark.parametrize("artifact,damage,name", VERIFY, ids=[v[0] for v in VERIFY])
def test_verify_says_ok_or_what_is_wrong(artifact, damage, name, w, capsys):
    if artifact not in ("run_stopped", "mol_stopped"):
        assert main(["verify", str(w / artifact)]) == 0
        assert capsys.readouterr().out.startswith("OK: ")
    damage(w)
    attack(capsys, ["verify", w / artifact], [w / artifact], expect=name)


def test_finished_labels_job_with_a_deleted_output_is_redone(w, capsys):
    assert main(_labels(w, w / "lab2")) == 0
    before = np.load(w / "lab2/top1_index.npy")
    assert "nothing to do" in (capsys.readouterr(), main(_labels(w, w / "lab2")[:-1]), capsys.readouterr().out)[2]
    (w / "lab2/top1_index.npy").unlink()
    assert main(_labels(w, w / "lab2")[:-1]) == 0
    out = capsys.readouterr().out
    assert "nothing to do" not in out and "computing them again" in out
    assert np.array_equal(np.load(w / "lab2/top1_index.npy"), before)
    assert main(["verify", str(w / "lab2")]) == 0


def test_resumed_index_build_reuses_kmeans_only_for_the_same_keys(w, capsys):
    """A build killed after its k-means resumes from it, unless the keys file changed."""
    from amips.index import IVFIndex

    env = dict(os.environ, AMIPS_FAULT_POINT="index-files", OMP_NUM_THREADS="1")

    def killed_build(out):
        run = subprocess.run([sys.executable, "-m", "amips", *map(str, _index(w, out))], env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode != 0 and (out / ".kmeans-stage.json").exists(), run.stderr

    killed_build(w / "ix_same")
    assert main(_index(w, w / "ix_same")[:-1]) == 0
    assert "resuming" in capsys.readouterr().out  # the control: same keys, k-means reused
    killed_build(w / "ix_changed")
    keys = np.load(w / "keys.npy")
    keys[0] *= -1  # the same path and shape, other content
    np.save(w / "keys.npy", keys)
    assert main(_index(w, w / "ix_changed")[:-1]) == 0
    assert "resuming" not in capsys.readouterr().out
    assert np.array_equal(IVFIndex.load(w / "ix_changed").keys().numpy(), keys)


def test_exit_code_and_provenance_of_a_successful_overwrite(w, capsys):
    """--overwrite that succeeds replaces the artifact whole (no file of the old one left)."""
    (w / "ix" / "pq.safetensors").write_bytes(b"stale")  # a file the new index would not write
    assert main([*_index(w, w / "ix"), "--overwrite"]) == 0
    assert not (w / "ix" / "pq.safetensors").exists()
    assert main(["verify", str(w / "ix")]) == 0
    assert not list(w.glob(".ix.amips-*"))


# --------------------------------------------------------------------------------------
# the machine says no: a full disk or a read-only location while the new artifact is written
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("errno_name", ["ENOSPC", "EROFS"])
@pytest.mark.parametrize("cmd", ["labels", "train", "index build", "mol train"])
def test_full_or_read_only_disk_mid_write_keeps_the_old_artifact(cmd, errno_name, w, capsys, monkeypatch):
    import errno

    import amips._io

    def refuse(self, data):
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))

    monkeypatch.setattr(amips._io._HashingWriter, "write", refuse)
    build, artifact, _ = WRITERS[cmd]
    line = attack(capsys, [*build(w, w / artifact), "--overwrite"], [w / artifact])
    assert os.strerror(getattr(errno, errno_name)) in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused_before_the_work(w, capsys):
    (w / "ro").mkdir()
    (w / "ro").chmod(0o500)
    try:
        attack(capsys, _index(w, w / "ro" / "ix"), [w / "ro"], expect="not writable")
        attack(capsys, [*_eval(w), "--json", w / "ro" / "r.json"], [w / "ro"], expect="not writable")
    finally:
        (w / "ro").chmod(0o700)


def test_hdf5_dataset_inputs_to_labels(w, capsys):
    h5py = pytest.importorskip("h5py")
    with h5py.File(w / "data.hdf5", "w") as f:
        f["train"] = np.load(w / "keys.npy")
        f["test"] = np.load(w / "queries.npy")
    assert main(["labels", "--keys", f"{w / 'data.hdf5'}:train", "--queries", f"{w / 'data.hdf5'}:test",
                 "--out", w / "lab_h5", "--quiet"]) == 0
    assert np.array_equal(np.load(w / "lab_h5/top1_index.npy"), np.load(w / "lab/top1_index.npy"))
    attack(capsys, ["labels", "--keys", f"{w / 'data.hdf5'}:nosuch", "--queries", f"{w / 'data.hdf5'}:test",
                    "--out", w / "lab_h5_2", "--quiet"], [w / "lab_h5"], expect="nosuch")


def test_exact_top1_on_tensors_that_require_grad():
    import torch

    from amips.labels import exact_top1

    rng = np.random.default_rng(5)
    q = torch.tensor(rng.standard_normal((7, 6)), dtype=torch.float32, requires_grad=True)
    k = torch.tensor(rng.standard_normal((40, 6)), dtype=torch.float32, requires_grad=True)
    scores, index = exact_top1(q, k)
    truth = (q.detach().double() @ k.detach().double().T).numpy()
    assert np.array_equal(index.numpy(), truth.argmax(1))
    assert np.allclose(scores.numpy(), truth.max(1), rtol=1e-6)


def test_overwrite_keeps_a_users_own_files_in_the_artifact_folder(w):
    (w / "ix" / "NOTES.md").write_text("how I built this index\n")
    assert main([*_index(w, w / "ix"), "--overwrite"]) == 0
    assert (w / "ix" / "NOTES.md").read_text() == "how I built this index\n"
    assert main(["verify", str(w / "ix")]) == 0


def test_a_folder_with_generic_names_is_not_taken_for_an_artifact(w, capsys):
    """A project folder with a state.json or config.json of its own is not a training run:
    writing inside it is allowed, and --overwrite never replaces it."""
    (w / "proj").mkdir()
    (w / "proj" / "state.json").write_text("{}")
    (w / "proj" / "config.json").write_text("{}")
    assert main(_labels(w, w / "proj" / "lab")) == 0
    attack(capsys, [*_train(w, w / "proj"), "--overwrite"], [w / "proj"], expect="not an amips training run")


def test_symlink_to_an_artifact_folder_is_written_through(w):
    """A symlinked output folder (a big disk, say) is replaced at its target; the link stays."""
    (w / "link").symlink_to(w / "ix")
    assert main([*_index(w, w / "link"), "--overwrite"]) == 0
    assert os.path.islink(w / "link") and (w / "ix" / "index.json").exists()
    assert main(["verify", str(w / "link")]) == 0


def test_missing_folders_above_an_artifact_are_created_but_not_above_a_file(w, capsys):
    assert main(_index(w, w / "runs" / "deep" / "ix")) == 0
    attack(capsys, [*_eval(w), "--json", w / "results" / "r.json"], [w / "ix"], expect="does not exist")
    (w / "a_file").write_text("x")
    attack(capsys, _index(w, w / "a_file" / "ix"), [w / "a_file"], expect="a_file")


def test_labels_resume_redoes_a_damaged_committed_batch(w):
    out = w / "lab_resume"
    job = [*_labels(w, out), "--batch-size", "16"]
    killed = subprocess.run([sys.executable, "-m", "amips", *map(str, job)], capture_output=True, text=True,
                            env=dict(os.environ, AMIPS_FAULT_POINT="labels-outputs", OMP_NUM_THREADS="1"),
                            timeout=120)
    assert killed.returncode == -9, killed.stderr
    batch = out / ".amips_labels_partial" / "batch_000001.npz"
    batch.write_bytes(batch.read_bytes()[:50])  # torn by hand (commits are atomic)
    (out / ".amips_labels_partial" / "job.json").write_text("{")  # and a torn job record: another job
    assert main(job) == 2  # ... so the partial work is refused without --overwrite
    (out / ".amips_labels_partial" / "job.json").unlink()
    assert main(job) == 0
    assert np.array_equal(np.load(out / "top1_index.npy"), np.load(w / "lab/top1_index.npy"))


def test_an_old_artifact_left_aside_by_a_killed_swap_is_put_back(w, capsys):
    """Killed between the two renames of a swap: the next writer restores the old folder."""
    before = snapshot(w / "ix")
    os.rename(w / "ix", w / ".ix.amips-old-999999")
    (w / ".ix.amips-new-999999").mkdir()  # and the unfinished replacement
    attack(capsys, _index(w, w / "ix"), [], expect="was put back")
    assert snapshot(w / "ix") == before
    assert not [p for p in w.glob(".ix.amips-*") if not p.name.endswith("-lock")]
    attack(capsys, _index(w, w / "ix"), [w / "ix"], expect="already holds an index")
