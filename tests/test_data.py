"""Data input: formats, dataset folders, the synthetic generator."""

import numpy as np
import pytest

from amips import InputError, load_array, load_dataset, synthetic
from amips.data import rows_float32, save_dataset


def _write_vecs(path, array, dtype):
    n, d = array.shape
    with open(path, "wb") as fh:
        for row in array:
            np.array([d], dtype=np.int32).tofile(fh)
            row.astype(dtype).tofile(fh)


@pytest.mark.parametrize("suffix,dtype", [(".fvecs", np.float32), (".ivecs", np.int32), (".bvecs", np.uint8)])
def test_vecs_formats_roundtrip(tmp_path, suffix, dtype):
    rng = np.random.default_rng(0)
    a = (rng.random((13, 7)) * 100).astype(dtype)
    _write_vecs(tmp_path / f"x{suffix}", a, dtype)
    b = load_array(tmp_path / f"x{suffix}")
    assert b.shape == (13, 7) and b.dtype == dtype
    np.testing.assert_array_equal(np.asarray(b), a)


def test_npy_is_memory_mapped_and_fp16_upcast(tmp_path):
    a = np.random.default_rng(1).standard_normal((20, 5)).astype(np.float16)
    np.save(tmp_path / "a.npy", a)
    m = load_array(tmp_path / "a.npy")
    assert isinstance(m, np.memmap) and m.dtype == np.float16
    block = rows_float32(m, 3, 9)
    assert block.dtype.is_floating_point and block.shape == (6, 5)
    np.testing.assert_array_equal(block.numpy(), a[3:9].astype(np.float32))


def test_hdf5_ann_benchmarks_layout(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(2)
    with h5py.File(tmp_path / "ds.hdf5", "w") as f:
        f["train"] = rng.standard_normal((30, 4)).astype(np.float32)
        f["test"] = rng.standard_normal((5, 4)).astype(np.float32)
        f["neighbors"] = np.zeros((5, 10), dtype=np.int32)
    assert load_array(tmp_path / "ds.hdf5").shape == (30, 4)
    assert load_array(f"{tmp_path / 'ds.hdf5'}:test").shape == (5, 4)
    assert load_array(f"{tmp_path / 'ds.hdf5'}:neighbors").shape == (5, 10)
    with pytest.raises(InputError, match="no dataset 'nope'"):
        load_array(f"{tmp_path / 'ds.hdf5'}:nope")


def test_bad_paths_and_formats(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_array(tmp_path / "missing.npy")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(InputError, match="unsupported file type"):
        load_array(tmp_path / "x.csv")
    (tmp_path / "bad.fvecs").write_bytes(np.array([3], np.int32).tobytes() + b"\x00" * 5)
    with pytest.raises(InputError, match="not a valid .fvecs"):
        load_array(tmp_path / "bad.fvecs")
    with pytest.raises(InputError, match="is not a folder"):
        load_dataset(tmp_path / "nothing")


def test_synthetic_is_seeded_and_document_like(tmp_path):
    a = synthetic(2000, 500, 32, seed=3)
    b = synthetic(2000, 500, 32, seed=3)
    c = synthetic(2000, 500, 32, seed=4)
    np.testing.assert_array_equal(a.keys, b.keys)
    assert not np.array_equal(a.keys, c.keys)
    np.testing.assert_allclose(np.linalg.norm(a.keys, axis=1), 1.0, atol=1e-5)
    assert a.queries_test.shape == (100, 32) and a.queries_train.shape == (400, 32)
    # clustered: top-1 scores well above those of random directions
    top = (a.queries_test @ a.keys.T).max(1)
    assert top.mean() > 0.5
    v = synthetic(500, 50, 16, unit_norm=False, seed=0)
    norms = np.linalg.norm(v.keys, axis=1)
    assert norms.std() > 0.1
    root = save_dataset(a, tmp_path / "ds")
    back = load_dataset(root)
    np.testing.assert_array_equal(np.asarray(back.keys), a.keys)
    assert "2,000 keys" in back.describe()
    with pytest.raises(InputError, match="test_fraction"):
        synthetic(10, 10, 4, test_fraction=1.5)


def test_real_dataset_folder(shared_data):
    ds = load_dataset(shared_data / "wordnet")
    assert ds.keys.shape == (117659, 384) and ds.keys.dtype == np.float16
    assert ds.queries_train.shape == (50000, 384) and ds.queries_test.shape == (10000, 384)
    assert ds.gt_test_top1.shape == (10000,)
