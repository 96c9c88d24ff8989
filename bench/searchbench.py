"""Helpers the search benchmarks share: run `search/run.py` as a user would, read what it wrote."""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from results.store import ExperimentStore, canonical_epochs  # noqa: E402


def add_size_args(p: argparse.ArgumentParser, train: int, val: int) -> None:
    """--train-size, --val-size and --keep, as every search benchmark takes them."""
    p.add_argument("--train-size", type=int, default=train)
    p.add_argument("--val-size", type=int, default=val)
    p.add_argument("--keep", help="keep the experiments in this folder (default: a temporary "
                                  "folder, removed when the benchmark exits)")


def add_asha_arg(p: argparse.ArgumentParser) -> None:
    """--asha: which of `search/run.py`'s two ASHAs to run (promotion-based by default)."""
    p.add_argument("--asha", choices=("asha-promote", "asha"), default="asha-promote",
                   help="promotion-based ASHA (default) or Ray's stop-based one")


def size_flags(args: argparse.Namespace) -> list[str]:
    """The `search/run.py` flags for the benchmark's --train-size and --val-size."""
    return ["--train-size", str(args.train_size), "--val-size", str(args.val_size)]


def workdir(keep: str | None) -> Path:
    """Where the benchmark's experiments go: --keep DIR, else a fresh temporary folder.

    The temporary folder is removed when the benchmark exits (a search leaves 100 MB or more of
    Parquet and checkpoints); what the benchmark reports is in its JSON line by then.
    """
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        return Path(keep)
    folder = Path(tempfile.mkdtemp(prefix="fmnist-bench-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def search(storage: Path, name: str, *flags: str, quiet: bool = True,
           program: list[str] | None = None) -> dict:
    """Run one search command end to end; wall time is the whole command, Python start included.

    `program` runs instead of `search/run.py` (its command before the search's flags), for a
    benchmark that swaps in a variant of the trainable. Returns wall_s, the exit code, the
    start time (epoch seconds) and the experiment's raw and canonical epochs and its trials.
    """
    cmd = [*(program or [sys.executable, str(REPO / "search" / "run.py")]),
           "--storage", str(storage), "--name", name, *flags]
    print("$", " ".join(cmd[1:]), file=sys.stderr, flush=True)
    t0_wall, t0 = time.time(), time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, capture_output=quiet, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        tail = (out.stderr or "")[-2000:] if quiet else ""
        raise SystemExit(f"search {name} exited {out.returncode} (--keep DIR keeps its "
                         f"files)\n{tail}")
    store = ExperimentStore(str(storage), name)
    raw = store.read_epochs(canonical=False)  # read once; the canonical view is derived
    return {"wall_s": wall, "start": t0_wall, "raw": raw, "epochs": canonical_epochs(raw),
            "trials": store.read_trials()}


def time_to_target(epochs: pd.DataFrame, start: float, target: float) -> float | None:
    """Seconds from `start` until any trial's validation accuracy first reached `target`."""
    hit = epochs[epochs["val_accuracy"] >= target]
    if hit.empty:
        return None
    return float(hit["timestamp"].min().timestamp() - start)


def epoch_ends(raw: pd.DataFrame) -> pd.Series:
    """When each epoch row ended (epoch seconds): its timestamp."""
    return raw["timestamp"].map(lambda t: t.timestamp())


def epoch_starts(raw: pd.DataFrame) -> pd.Series:
    """When each epoch row began (epoch seconds): its end minus its epoch time."""
    return epoch_ends(raw) - raw["epoch_time_s"]


def target_for(bests: list[float], given: float | None) -> float:
    """The time-to-target level: `given`, else the lower of the final bests minus 0.3 points."""
    return given if given is not None else round(min(bests) - 0.003, 4)


def median(values: list[float | None], digits: int = 3) -> float | None:
    """Median of the values that exist, rounded; None if there are none."""
    present = [v for v in values if v is not None]
    return round(statistics.median(present), digits) if present else None


# The reference CNN: two conv blocks (32, 64 filters), dense 64, dropout 0.25, Adam 1e-3.
REFERENCE = dict(model="cnn", blocks=2, base_filters=32, dense_units=64, dropout=0.25,
                 optimizer="adam", learning_rate=1e-3, batch_size=128)


def reference_space(folder: Path) -> Path:
    """A space file with every value fixed to REFERENCE: each sample is the same config."""
    path = folder / "fixed-cnn.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in REFERENCE.items()))
    return path
