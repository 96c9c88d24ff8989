import gzip
from pathlib import Path

import numpy as np
import pytest

from fmnist import data
from fmnist.data import DataError, load_split, load_splits, load_test, read_idx, write_idx
from tests.conftest import write_dataset

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_idx_round_trip(tmp_path, name, dtype):
    array = (np.arange(2 * 3 * 4) * 7 % 251).astype(dtype).reshape(2, 3, 4)
    write_idx(tmp_path / name, array)
    back = read_idx(tmp_path / name)
    assert back.dtype == np.dtype(dtype) and back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, array)
    if name.endswith(".gz"):
        assert (tmp_path / name).read_bytes()[:2] == b"\x1f\x8b"


def _corrupt(folder: Path, stem: str, mutate) -> Path:
    path = folder / f"{stem}.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(mutate(raw)))
    return path


def test_wrong_magic_names_file(tmp_path):
    folder = write_dataset(tmp_path / "d", 50, 20)
    path = _corrupt(folder, "train-images-idx3-ubyte", lambda b: b"\x12\x34" + b[2:])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: wrong magic number"):
        load_split("train", folder)
    assert str(path) in str(pytest.raises(DataError, load_split, "train", folder).value)


def test_truncated_file(tmp_path):
    folder = write_dataset(tmp_path / "d", 50, 20)
    _corrupt(folder, "train-images-idx3-ubyte", lambda b: b[:-100])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: truncated"):
        load_split("train", folder)


def test_truncated_gzip(tmp_path):
    folder = write_dataset(tmp_path / "d", 50, 20)
    path = folder / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: corrupt or truncated gzip"):
        load_split("train", folder)


def test_count_mismatch(tmp_path):
    folder = write_dataset(tmp_path / "d", 50, 20)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(49, np.uint8))
    with pytest.raises(DataError, match=r"count mismatch: 49 labels for 50 images"):
        load_split("train", folder)


def test_label_out_of_range(tmp_path):
    folder = write_dataset(tmp_path / "d", 50, 20)
    labels = np.zeros(20, np.uint8)
    labels[7] = 12
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: label 12 out of range 0..9"):
        load_split("test", folder)


def test_raw_files_are_read_too(tmp_path):
    folder = write_dataset(tmp_path / "d", 50, 20)
    for path in folder.glob("*.gz"):
        path.with_suffix("").write_bytes(gzip.decompress(path.read_bytes()))
        path.unlink()
    x, y, _ = load_split("train", folder)
    assert x.shape == (50, 28, 28) and y.shape == (50,)


def test_missing_explicit_dir_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_split("train", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="lacks train-images-idx3-ubyte"):
        load_split("train", tmp_path / "empty")


def test_a_folder_without_the_test_files_serves_the_search_only(monkeypatch, tiny_data_dir,
                                                                 tmp_path):
    # The test pair can be kept away from a search: it reads the train files alone
    train_only = tmp_path / "train-only"
    train_only.mkdir()
    for path in tiny_data_dir.iterdir():
        if path.name.startswith("train-"):
            (train_only / path.name).write_bytes(path.read_bytes())
    splits = load_splits(train_only, val_size=100, train_size=200)
    assert len(splits.y_train) == 200 and splits.source.location == str(train_only)
    with pytest.raises(DataError, match=r"lacks t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
                                        r"\(.gz or raw\), which the test split is read from$"):
        load_test(train_only)
    # found without being named, too: the system folder holding the train files only
    monkeypatch.delenv("FMNIST_DATA_DIR", raising=False)
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion_mnist", train_only)
    assert data.resolve_data_dir(None, "fashion_mnist", "train") == train_only
    assert data.resolve_data_dir(None, "fashion_mnist", "test") != train_only


def test_a_source_tells_the_published_files_from_others():
    published = {"t10k-images-idx3-ubyte": "5b4141f0" + "0" * 56,
                 "t10k-labels-idx1-ubyte": "0402a96d" + "0" * 56}
    assert data.Source("fashion_mnist", "/d", published).published is True
    changed = {**published, "t10k-labels-idx1-ubyte": "1" * 64}
    assert data.Source("fashion_mnist", "/d", changed).published is False
    assert data.Source("mnist", "/d", published).published is None  # no digests known
    assert data.Source("fashion_mnist", data.KERAS_DOWNLOAD, published).published is None


@pytest.mark.parametrize("dataset", ["fashion_mnist", "mnist"])
def test_nothing_found_lists_every_place(monkeypatch, tmp_path, dataset):
    # Point the system and cache folders at empty places, and make the last resort, Keras'
    # download, fail as it does without the network.
    import keras

    def offline():
        raise OSError("URL fetch failure: [Errno -2] Name or service not known")

    monkeypatch.delenv("FMNIST_DATA_DIR", raising=False)
    monkeypatch.setitem(data.SYSTEM_DIRS, dataset, tmp_path / "sys")
    monkeypatch.setitem(data.KERAS_CACHE_DIRS, dataset, tmp_path / "cache")
    monkeypatch.setattr(getattr(keras.datasets, dataset), "load_data", offline)
    with pytest.raises(DataError) as info:
        load_split("train", None, dataset)
    message = str(info.value)
    assert message.startswith(f"{dataset} not found")
    assert str(tmp_path / "sys") in message and str(tmp_path / "cache") in message
    assert "Name or service not known" in message and "--data-dir" in message
    assert "train-labels-idx1-ubyte" in message and "t10k" not in message  # what train needs
    # Debian packages Fashion-MNIST, not MNIST: only the first gets the apt-get hint
    assert ("apt-get install dataset-fashion-mnist" in message) == (dataset == "fashion_mnist")


def test_env_var_is_a_source(monkeypatch, tiny_data_dir, tmp_path):
    monkeypatch.setenv("FMNIST_DATA_DIR", str(tiny_data_dir))
    x, _, source = load_split("train")
    assert len(x) == 600 and source.location == str(tiny_data_dir)
    monkeypatch.setenv("FMNIST_DATA_DIR", str(tmp_path / "gone"))  # says where it came from
    with pytest.raises(DataError, match=r"^data dir .*gone \(from FMNIST_DATA_DIR\) does not"):
        load_split("train")


def test_real_fashion_mnist():
    assert FMNIST_DIR.is_dir(), "run the README set-up: apt-get install dataset-fashion-mnist"
    x, y, src = load_split("train", FMNIST_DIR, verify=True)
    xt, yt, src_t = data.load_test(FMNIST_DIR, verify=True)
    assert x.shape == (60_000, 28, 28) and xt.shape == (10_000, 28, 28)
    assert x.dtype == np.uint8 and y.dtype == np.uint8
    assert np.bincount(y).tolist() == [6_000] * 10
    assert np.bincount(yt).tolist() == [1_000] * 10
    digests = {**src.sha256, **src_t.sha256}
    for stem, prefix in data.KNOWN_SHA256_PREFIX["fashion_mnist"].items():
        assert digests[stem].startswith(prefix), stem
    assert abs(x.mean() - 72.94) < 0.01 and abs(x.std() - 90.02) < 0.01
    splits = load_splits(FMNIST_DIR)
    assert splits.sizes == {"train": 48_000, "val": 12_000}
    assert np.bincount(splits.y_val).tolist() == [1_200] * 10
    assert splits.class_names[0] == "T-shirt/top" and splits.class_names[9] == "Ankle boot"


def test_fingerprint_mismatch_when_verifying(tmp_path):
    folder = write_dataset(tmp_path / "d", 50, 20)
    load_split("train", folder, "mnist", verify=True)  # no known digests for mnist: passes
    with pytest.raises(DataError, match="fingerprint mismatch"):
        load_split("train", folder, "fashion_mnist", verify=True)


def test_split_is_stratified_and_deterministic(tiny_data_dir):
    a = load_splits(tiny_data_dir, val_size=100, seed=3)
    b = load_splits(tiny_data_dir, val_size=100, seed=3)
    c = load_splits(tiny_data_dir, val_size=100, seed=4)
    np.testing.assert_array_equal(a.x_val, b.x_val)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.x_val, c.x_val)
    assert np.bincount(a.y_val).tolist() == [10] * 10
    assert np.bincount(a.y_train).tolist() == [50] * 10
    # No image is in both splits (images are unique here by their noise).
    train_rows = {row.tobytes() for row in a.x_train}
    assert not any(row.tobytes() in train_rows for row in a.x_val)
    assert a.source.fingerprint == c.source.fingerprint


def test_subsets_are_balanced_and_keep_validation(tiny_data_dir):
    full = load_splits(tiny_data_dir, val_size=100, seed=1)
    sub = load_splits(tiny_data_dir, val_size=100, train_size=73, seed=1)
    np.testing.assert_array_equal(full.x_val, sub.x_val)  # val independent of train_size
    counts = np.bincount(sub.y_train, minlength=10)
    assert counts.sum() == 73 and counts.max() - counts.min() <= 1
    with pytest.raises(DataError, match="train_size must be between"):
        load_splits(tiny_data_dir, val_size=100, train_size=10_000)
    # every class in each split: no fewer images than classes
    with pytest.raises(DataError, match=r"^train_size must be between 10 \(one image of each "
                                        r"class\) and 500 .*, got 9$"):
        load_splits(tiny_data_dir, val_size=100, train_size=9)
    with pytest.raises(DataError, match=r"^val_size must be between 10 .* and 590, got 5$"):
        load_splits(tiny_data_dir, val_size=5)
    smallest = load_splits(tiny_data_dir, val_size=10, train_size=10)
    assert sorted(smallest.y_train) == sorted(smallest.y_val) == list(range(10))
