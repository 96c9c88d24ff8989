"""Synthetic experiments in the real Parquet layout, for tests and benchmarks of the analysis.

Accuracy follows a known function of the learning rate (peak at `best_lr`) and rises with
epochs, so plots and boundary checks have a right answer.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa

from results.store import EPOCH_SCHEMA, TRIAL_COLUMNS, ExperimentStore

SPACE = {"model": "cnn", "epochs": 50, "learning_rate": {"loguniform": [1e-4, 1e-1]},
         "dropout": {"uniform": [0.0, 0.5]}, "batch_size": {"choice": [64, 128, 256]}}


def write_synthetic(root: str, name: str, trials: int, max_epochs: int, seed: int = 0,
                    best_lr: float = 3e-3, searcher: str = "random", scheduler: str = "asha",
                    space_name: str = "cnn", stopped_fraction: float = 0.7,
                    parts: int = 1) -> ExperimentStore:
    """Write an experiment of `trials` trials; most stop early, as under ASHA."""
    rng = np.random.default_rng(seed)
    store = ExperimentStore(root, name)
    lr = np.exp(rng.uniform(np.log(1e-4), np.log(1e-1), trials))
    dropout = rng.uniform(0, 0.5, trials)
    batch = rng.choice([64, 128, 256], trials)
    quality = 0.92 - 0.04 * np.log10(lr / best_lr) ** 2 - 0.05 * dropout
    ran = np.where(rng.random(trials) < stopped_fraction,
                   rng.integers(1, max(2, max_epochs // 3) + 1, trials), max_epochs)
    ids = np.array([f"t{i:05d}" for i in range(trials)])
    n = int(ran.sum())
    trial_idx = np.repeat(np.arange(trials), ran)
    epoch = np.concatenate([np.arange(1, r + 1) for r in ran])
    acc = quality[trial_idx] * (1 - 0.5 * np.exp(-epoch / 3)) + rng.normal(0, 0.002, n)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    # Trials run two at a time in id order; each epoch takes 10 s.
    slot_end = np.cumsum(ran) * 5.0
    ts = [start + timedelta(seconds=float(slot_end[t] - (ran[t] - e) * 10.0))
          for t, e in zip(trial_idx, epoch, strict=True)]
    epochs = pd.DataFrame({
        "trial_id": ids[trial_idx], "epoch": epoch, "attempt": 0, "timestamp": ts,
        "loss": 1 - acc, "accuracy": acc + 0.01, "val_loss": 1.05 - acc, "val_accuracy": acc,
        "lr": lr[trial_idx], "epoch_time_s": 10.0, "train_time_s": 9.0, "samples_per_s": 1000.0,
        "node": "node-a", "node_ip": "127.0.0.1", "gpu_ids": "", "data_sha256": "x",
        "precision": "float32",
    })
    # The recorder writes one part per flush; `parts` mimics that many files.
    for i, chunk in enumerate(np.array_split(np.arange(len(epochs)), parts)):
        table = pa.Table.from_pandas(epochs.iloc[chunk], schema=EPOCH_SCHEMA,
                                     preserve_index=False)
        store.write_table(table, f"epochs/part-synthetic-{i:06d}.parquet")
    best_epoch = epochs.loc[epochs.groupby("trial_id")["val_accuracy"].idxmax()]
    last = epochs.groupby("trial_id").tail(1)
    rows = pd.DataFrame({
        "trial_id": ids, "family": "cnn",
        "status": np.where(ran == max_epochs, "completed", "stopped"),
        "stop_reason": [("completed" if r == max_epochs else f"stopped by {scheduler} at epoch {r}")
                        for r in ran],
        "epochs": ran, "best_val_accuracy": best_epoch["val_accuracy"].to_numpy(),
        "best_epoch": best_epoch["epoch"].to_numpy(),
        "last_val_accuracy": last["val_accuracy"].to_numpy(),
        "start_time": start, "end_time": start, "wall_time_s": ran * 10.0,
        "train_time_s": ran * 10.0, "cpus": 1.0, "gpus": 0.0, "node": "node-a", "gpu_ids": "",
        "data_sha256": "x", "precision": "float32", "failures": 0, "error": None,
        "written_at": start,
        "params_model": "cnn", "params_learning_rate": lr, "params_dropout": dropout,
        "params_batch_size": batch, "params_epochs": max_epochs,
    })
    schema = pa.schema([*TRIAL_COLUMNS, ("params_model", pa.string()),
                        ("params_learning_rate", pa.float64()), ("params_dropout", pa.float64()),
                        ("params_batch_size", pa.int64()), ("params_epochs", pa.int64())])
    store.write_table(pa.Table.from_pandas(rows, schema=schema, preserve_index=False),
                      "trials/part-synthetic.parquet")
    store.write_experiment({
        "name": name, "created_at": start, "space_name": space_name,
        "space": json.dumps({**SPACE, "epochs": max_epochs}), "scheduler": scheduler,
        "scheduler_settings": {"max_t": max_epochs, "rungs": [1, 3, 9, 27]},
        "searcher": searcher, "num_samples": trials, "max_epochs": max_epochs,
        "dataset": "fashion_mnist", "dataset_fingerprint": "synthetic", "data_location": "-",
        "train_size": 0, "val_size": 0, "split_seed": 0, "versions": {}, "command": "synthetic",
    })
    return store
