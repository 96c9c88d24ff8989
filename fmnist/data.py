"""Fashion-MNIST (and any MNIST-format dataset): IDX reading, sources, splits, fingerprints.

No Ray, no Keras at import time: Keras is imported only for the last-resort download.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASS_NAMES = {
    "fashion_mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "mnist": tuple(str(d) for d in range(10)),
}
NUM_CLASSES = 10

# File stems; each may be stored gzipped (`.gz`) or raw.
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

ALL_FILES = [name for pair in FILES.values() for name in pair]

# Where Debian/Ubuntu packages put the files (`apt-get install dataset-fashion-mnist`).
SYSTEM_DIRS = {
    "fashion_mnist": Path("/usr/share/datasets/fashion-mnist"),
    "mnist": Path("/usr/share/datasets/mnist"),
}
# Where keras.datasets caches its downloads.
KERAS_CACHE_DIRS = {
    "fashion_mnist": Path("~/.keras/datasets/fashion-mnist"),
    "mnist": Path("~/.keras/datasets/mnist"),
}

# sha256 of the decompressed files as packaged by Debian (DESIGN.md), used by `verify=True`.
KNOWN_SHA256_PREFIX = {
    "fashion_mnist": {
        "train-images-idx3-ubyte": "c59f468a",
        "train-labels-idx1-ubyte": "bad3541b",
        "t10k-images-idx3-ubyte": "5b4141f0",
        "t10k-labels-idx1-ubyte": "0402a96d",
    }
}

KERAS_DOWNLOAD = "keras.datasets download"  # a Source's location when Keras downloaded it

# Default validation split, as in the notebooks: 48,000 train / 12,000 validation.
DEFAULT_VAL_SIZE = 12_000

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
    """A data file or folder is missing, malformed or not what was expected."""


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip data ({exc})") from None
    return raw


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse decompressed IDX bytes into an array, checking header, dimensions and size."""
    if len(raw) < 4:
        raise DataError(f"{name}: too short to be an IDX file ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{name}: wrong magic number 0x{raw[:4].hex()} (not an IDX file)")
    ndim = raw[3]
    if ndim < 1 or ndim > 4:
        raise DataError(f"{name}: implausible number of dimensions {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: truncated header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    actual = len(raw) - header
    if actual < expected:
        raise DataError(
            f"{name}: truncated: header says {shape} ({expected} bytes of data), "
            f"file has {actual}"
        )
    if actual > expected:
        raise DataError(f"{name}: {actual - expected} unexpected bytes after the data {shape}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(
        dtype.newbyteorder("=")
    )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or raw)."""
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> None:
    """Write `array` as an IDX file; gzipped when the name ends in .gz (or `compress`)."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    codes = {np.dtype(v).newbyteorder(">").str: k for k, v in _IDX_DTYPES.items()}
    code = 0x08 if array.dtype == np.uint8 else codes[array.dtype.newbyteorder(">").str]
    header = bytes([0, 0, code, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    data = header + body
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=6)
    path.write_bytes(data)


def _find_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _stems(split: str | None) -> list[str]:
    """The files a split is read from; all four without one."""
    return list(FILES[split]) if split else ALL_FILES


def candidate_dirs(data_dir: str | os.PathLike | None, dataset: str) -> list[Path]:
    """Folders searched, in order (DESIGN.md): explicit/env, system package, Keras cache."""
    out = []
    explicit = data_dir or os.environ.get("FMNIST_DATA_DIR")
    if explicit:
        out.append(Path(explicit).expanduser())
    out.append(SYSTEM_DIRS[dataset])
    out.append(KERAS_CACHE_DIRS[dataset].expanduser())
    return out


def folder_problem(path: str | os.PathLike) -> str | None:
    """Why a local folder cannot be created or written, or None.

    Probes by creating and removing an empty folder in it, or in its nearest existing
    parent, so nothing is left behind.
    """
    probe = Path(path).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fmnist-probe-", dir=probe))
    except OSError as exc:
        return f"cannot create folders in {probe} ({exc.strerror or exc})"
    return None


def resolve_data_dir(
    data_dir: str | os.PathLike | None = None, dataset: str = "fashion_mnist",
    split: str | None = None,
) -> Path | None:
    """Return the folder holding `split`'s two IDX files (all four without a split), or None
    when only a download could help.

    A search needs the train files only, so a folder without the test pair serves it (the
    test set can be kept elsewhere until the final evaluation). An explicit folder (argument or
    FMNIST_DATA_DIR) that lacks the files is an error: the user asked for it, so silently
    reading other data would be wrong.
    """
    check_dataset_name(dataset)
    stems = _stems(split)
    explicit = data_dir or os.environ.get("FMNIST_DATA_DIR")
    if explicit:
        folder = Path(explicit).expanduser()
        named = "" if data_dir else " (from FMNIST_DATA_DIR)"  # else it is a mystery folder
        if not folder.is_dir():
            raise DataError(f"data dir {folder}{named} does not exist")
        missing = [s for s in stems if not _find_file(folder, s)]
        if missing:
            raise DataError(f"data dir {folder}{named} lacks {', '.join(missing)} (.gz or raw)"
                            + (f", which the {split} split is read from" if split else ""))
        return folder
    for folder in candidate_dirs(None, dataset):
        if all(_find_file(folder, stem) for stem in stems):
            return folder
    return None


def check_dataset_name(dataset: str) -> None:
    if dataset not in CLASS_NAMES:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(CLASS_NAMES)}")


def _keras_download(dataset: str, searched: list[Path], split: str) -> dict[str, np.ndarray]:
    try:
        from fmnist.startup import import_keras

        module = getattr(import_keras().datasets, dataset)
        (x_train, y_train), (x_test, y_test) = module.load_data()
    except Exception as exc:  # network errors come in many types
        places = "\n  ".join(str(p) for p in searched)
        # Debian packages Fashion-MNIST only; MNIST has no package to point to.
        package = ("`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or "
                   if dataset == "fashion_mnist" else "")
        raise DataError(
            f"{dataset} not found. Looked in:\n  {places}\n  and a Keras download ({exc}).\n"
            f"Get the data with {package}the IDX files ({', '.join(_stems(split))}, .gz or "
            "raw) in a folder passed as --data-dir or FMNIST_DATA_DIR."
        ) from None
    return {
        "train": (x_train.astype(np.uint8), y_train.astype(np.uint8)),
        "test": (x_test.astype(np.uint8), y_test.astype(np.uint8)),
    }


def _check_pair(images: np.ndarray, labels: np.ndarray, img_path: str, lbl_path: str) -> None:
    if images.ndim != 3:
        raise DataError(f"{img_path}: expected 3 dimensions (N, rows, cols), got {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{lbl_path}: expected 1 dimension (N,), got {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{lbl_path}: count mismatch: {labels.shape[0]} labels for "
            f"{images.shape[0]} images in {Path(img_path).name}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        bad = int(labels[(labels < 0) | (labels >= NUM_CLASSES)][0])
        raise DataError(f"{lbl_path}: label {bad} out of range 0..{NUM_CLASSES - 1}")


# What a search trial receives: the train and validation arrays, never the test split.
DATA_KEYS = ("x_train", "y_train", "x_val", "y_val")


@dataclass(frozen=True)
class Source:
    """Where a dataset was read from, with per-file sha256 of the decompressed bytes."""

    dataset: str
    location: str
    sha256: dict[str, str]

    @property
    def fingerprint(self) -> str:
        """One digest for the whole dataset: sha256 over the per-file digests, in file order."""
        joined = "".join(f"{k}:{v};" for k, v in sorted(self.sha256.items()))
        return hashlib.sha256(joined.encode()).hexdigest()

    @property
    def published(self) -> bool | None:
        """Whether every file is the published one (KNOWN_SHA256_PREFIX); None where that
        cannot be told (no known digests, or arrays from a Keras download, hashed without
        their IDX headers)."""
        known = KNOWN_SHA256_PREFIX.get(self.dataset)
        if not known or self.location == KERAS_DOWNLOAD:
            return None
        return all(stem in known and digest.startswith(known[stem])
                   for stem, digest in self.sha256.items())


def load_split(
    which: str,
    data_dir: str | os.PathLike | None = None,
    dataset: str = "fashion_mnist",
    verify: bool = False,
) -> tuple[np.ndarray, np.ndarray, Source]:
    """Load the `train` or `test` split: uint8 images (N, 28, 28), uint8 labels (N,), source."""
    if which not in FILES:
        raise ValueError(f"split must be 'train' or 'test', not {which!r}")
    folder = resolve_data_dir(data_dir, dataset, which)
    if folder is None:
        arrays = _keras_download(dataset, candidate_dirs(data_dir, dataset), which)
        images, labels = arrays[which]
        digests = {
            FILES[which][0]: hashlib.sha256(images.tobytes()).hexdigest(),
            FILES[which][1]: hashlib.sha256(labels.tobytes()).hexdigest(),
        }
        return images, labels, Source(dataset, KERAS_DOWNLOAD, digests)
    img_stem, lbl_stem = FILES[which]
    img_path, lbl_path = _find_file(folder, img_stem), _find_file(folder, lbl_stem)
    raw_images, raw_labels = _read_bytes(img_path), _read_bytes(lbl_path)
    images = parse_idx(raw_images, str(img_path))
    labels = parse_idx(raw_labels, str(lbl_path))
    _check_pair(images, labels, str(img_path), str(lbl_path))
    digests = {
        img_stem: hashlib.sha256(raw_images).hexdigest(),
        lbl_stem: hashlib.sha256(raw_labels).hexdigest(),
    }
    if verify:
        known = KNOWN_SHA256_PREFIX.get(dataset, {})
        for stem, digest in digests.items():
            if stem in known and not digest.startswith(known[stem]):
                path = img_path if stem == img_stem else lbl_path
                raise DataError(
                    f"{path}: fingerprint mismatch: sha256 {digest[:8]}..., "
                    f"expected {known[stem]}... for {dataset}"
                )
    return images.astype(np.uint8), labels.astype(np.uint8), Source(dataset, str(folder), digests)


def stratified_indices(
    labels: np.ndarray, size: int, seed: int, exclude: np.ndarray | None = None
) -> np.ndarray:
    """Pick `size` indices with classes in proportion to `labels` (largest remainder), seeded.

    Indices in `exclude` are never picked. The result is sorted, so the same seed gives the same
    set whatever order the caller uses it in.
    """
    rng = np.random.default_rng(seed)
    pool = np.ones(len(labels), bool)
    if exclude is not None:
        pool[exclude] = False
    classes = np.unique(labels[pool])
    per_class = {c: np.flatnonzero(pool & (labels == c)) for c in classes}
    total = int(pool.sum())
    if size > total:
        raise DataError(f"asked for {size} examples but only {total} are available")
    quotas = {c: size * len(idx) / total for c, idx in per_class.items()}
    counts = {c: int(np.floor(q)) for c, q in quotas.items()}
    leftover = size - sum(counts.values())
    for c in sorted(classes, key=lambda c: (-(quotas[c] - counts[c]), c))[:leftover]:
        counts[c] += 1
    picked = [rng.choice(per_class[c], counts[c], replace=False) for c in classes]
    return np.sort(np.concatenate(picked)) if picked else np.array([], dtype=np.int64)


def digest_arrays(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over arrays in key order: proves which data a trial trained on."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Splits:
    """What a search sees: train and validation only. The test split is never in here."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    dataset: str
    class_names: tuple[str, ...]
    source: Source
    seed: int

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in DATA_KEYS}

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val)}


def load_splits(
    data_dir: str | os.PathLike | None = None,
    dataset: str = "fashion_mnist",
    val_size: int = DEFAULT_VAL_SIZE,
    train_size: int | None = None,
    seed: int = 0,
    verify: bool = False,
) -> Splits:
    """Stratified, seeded train/validation split of the training file.

    `val_size` images go to validation first (so the validation set for a given seed does not
    depend on `train_size`); `train_size` then takes a class-balanced subset of the rest.
    """
    x, y, source = load_split("train", data_dir, dataset, verify=verify)
    # Fewer images than classes would leave classes out of a split that is meant to hold them
    # in proportion (a model trained on 5 images of 5 classes scored 0 on the other 5).
    classes = len(np.unique(y))
    if val_size < classes or val_size > len(y) - classes:
        raise DataError(f"val_size must be between {classes} (one image of each class) and "
                        f"{len(y) - classes}, got {val_size}")
    val_idx = stratified_indices(y, val_size, seed)
    rest = len(y) - val_size
    if train_size is None:
        train_idx = np.setdiff1d(np.arange(len(y)), val_idx)
    else:
        if train_size < classes or train_size > rest:
            raise DataError(f"train_size must be between {classes} (one image of each class) "
                            f"and {rest} (the {len(y)} training images less val_size "
                            f"{val_size}), got {train_size}")
        train_idx = stratified_indices(y, train_size, seed + 1, exclude=val_idx)
    return Splits(
        x_train=x[train_idx],
        y_train=y[train_idx],
        x_val=x[val_idx],
        y_val=y[val_idx],
        dataset=dataset,
        class_names=CLASS_NAMES[dataset],
        source=source,
        seed=seed,
    )


def load_test(
    data_dir: str | os.PathLike | None = None, dataset: str = "fashion_mnist", verify: bool = False
) -> tuple[np.ndarray, np.ndarray, Source]:
    """The held-out test split. Only the final evaluation calls this."""
    return load_split("test", data_dir, dataset, verify=verify)
