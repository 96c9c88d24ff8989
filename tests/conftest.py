"""Shared fixtures: tiny MNIST-format datasets on disk, and one real local Ray per session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fmnist.data import FILES, write_idx  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_images(labels: np.ndarray, seed: int, marker: int | None = None) -> np.ndarray:
    """Learnable synthetic images: class c lights up row band c; noise on top.

    `marker` sets pixel (0, 0) of every image, so tests can tell which file an image came from.
    """
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(len(labels), 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
        images[i, 2 + 2 * c : 4 + 2 * c, 4:24] = 230
    if marker is not None:
        images[:, 0, 0] = marker
    return images


def write_dataset(folder: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    """A tiny, balanced, learnable dataset in the four IDX files. Test images carry marker 255."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y_train = np.resize(np.arange(10, dtype=np.uint8), n_train)
    rng.shuffle(y_train)
    y_test = np.resize(np.arange(10, dtype=np.uint8), n_test)
    x_train = make_images(y_train, seed, marker=1)
    x_test = make_images(y_test, seed + 1, marker=255)
    for (img, lbl), (x, y) in zip(
        (FILES["train"], FILES["test"]), ((x_train, y_train), (x_test, y_test)), strict=True
    ):
        write_idx(folder / f"{img}.gz", x)
        write_idx(folder / f"{lbl}.gz", y)
    return folder


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("tiny-fmnist"))


TINY_SPACE = """\
model: mlp
epochs: 2
units: {choice: [8, 16]}
hidden_layers: 1
batch_size: 64
learning_rate: {loguniform: [1.0e-3, 1.0e-2]}
dropout: {uniform: [0.0, 0.2]}
"""


@pytest.fixture(scope="session")
def tiny_space(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spaces") / "tiny.yaml"
    path.write_text(TINY_SPACE)
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole session (2 CPUs, loopback, no dashboard)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, logging_level="WARNING",
             runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}})
    yield ray
    ray.shutdown()


def search_args(data_dir: Path, space: Path, storage: Path, name: str, *extra: str) -> list[str]:
    """Arguments of a tiny search: 200 training and 100 validation images."""
    return ["--space", str(space), "--data-dir", str(data_dir), "--storage", str(storage),
            "--name", name, "--train-size", "200", "--val-size", "100", *extra]
